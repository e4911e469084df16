"""The sweep's progress line (finetune.sweep.progress): counts, time left, best so far; plain without a
terminal, a tqdm bar on one; the total from the sweep's overrides or Optuna's n_trials."""
from __future__ import annotations

import io

from omegaconf import OmegaConf

from finetune.sweep.progress import SweepProgress, expected_jobs


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_count_jobs_time_left_and_the_best():
    clock, out = Clock(), io.StringIO()
    progress = SweepProgress(4, "final_val_accuracy", stream=out, clock=clock)
    clock.now = 10
    assert progress.job_done(0, 0.5, failed=False) == ("[sweep] 1/4 jobs done in 10 s, ~30 s left; "
                                                       "best final_val_accuracy 0.5000 (job 0)")
    clock.now = 20
    progress.job_done(1, None, failed=True)
    clock.now = 30
    line = progress.job_done(2, 0.75, failed=False)
    assert line == "[sweep] 3/4 jobs done in 30 s, ~10 s left, 1 failed; best final_val_accuracy 0.7500 (job 2)"
    assert out.getvalue().count("\n") == 3


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    clock = Clock()
    progress = SweepProgress(8, "final_val_accuracy", stream=Terminal(), clock=clock)
    clock.now = 12
    line = progress.job_done(3, 0.9, failed=False)
    assert line.startswith("[sweep] ") and "1/8" in line and "|" in line and "best final_val_accuracy 0.9000" in line


def test_the_total_from_sweep_overrides_or_n_trials():
    def config(task, **sweeper):
        return OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": sweeper}})

    assert expected_jobs(config(["head=linear,mlp", "optimizer.lr=1e-3,1e-2,1e-1", "trainer.epochs=2"])) == 6
    assert expected_jobs(config(["freeze.n=range(1,4)"])) == 3
    assert expected_jobs(config([], n_trials=32)) == 32
    assert expected_jobs(config(["freeze.n=choice(1,2,99)"], n_trials=20, sampler="grid",
                                params={"optimizer.lr": "choice(1e-3,1e-2)"})) == 6
    assert expected_jobs(config(["optimizer.lr=interval(1e-4,1e-2)"])) is None
