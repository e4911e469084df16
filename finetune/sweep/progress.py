"""A sweep's progress, drawn by the sweep's process after each job: jobs done out of the total, the
time left, and the best objective so far. On a terminal a tqdm bar line; in CI or a log file a plain
line (one a job: a modest rate, since jobs take seconds at least). Jobs print their own lines in
between, in-process or from their own process, so the line is printed once per job, not redrawn."""
from __future__ import annotations

import sys
import time

from omegaconf import DictConfig, OmegaConf


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: Optuna's n_trials, or the product of the basic sweeper's
    sweep overrides (a,b,c / range(...)); None when not known."""
    sweeper = config.hydra.sweeper
    if sweeper.get("n_trials") is not None:
        if sweeper.get("sampler") != "grid":
            return int(sweeper.n_trials)
        try:  # a grid stops when it is exhausted
            from finetune.sweep.optuna_study import grid_size, search_space

            space = search_space(OmegaConf.to_container(sweeper.get("params") or {}), list(config.hydra.overrides.task))
            return min(int(sweeper.n_trials), grid_size(space.distributions))
        except Exception:  # noqa: BLE001 - see below
            return int(sweeper.n_trials)
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        total = 1
        for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
            if override.is_sweep_override():
                total *= len(list(override.sweep_string_iterator()))
        return total
    except Exception:  # noqa: BLE001 - a sweep this cannot count still runs; the line leaves the total out
        return None


class SweepProgress:
    def __init__(self, total: int | None, objective: str, stream=None, clock=time.monotonic):
        self.total, self.objective, self.clock = total, objective, clock
        self.stream = stream if stream is not None else sys.stdout
        self.start, self.done, self.failed, self.best = clock(), 0, 0, None

    def job_done(self, number, value: float | None, failed: bool) -> str:
        """Count a finished job and print (and return) the progress line."""
        self.done += 1
        self.failed += int(failed)
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (float(value), number)
        line = self.line()
        print(line, file=self.stream, flush=True)
        return line

    def line(self) -> str:
        from finetune.progress_bar import is_terminal

        elapsed = self.clock() - self.start
        best = (f"best {self.objective} {self.best[0]:.4f} (job {self.best[1]})" if self.best
                else f"no {self.objective} yet")
        failed = f", {self.failed} failed" if self.failed else ""
        if is_terminal(self.stream) and self.total:
            from tqdm import tqdm

            return "[sweep] " + tqdm.format_meter(min(self.done, self.total), self.total, elapsed, ncols=100,
                                                  unit="job", postfix=best + failed)
        left = ""
        if self.total and self.done < self.total:
            left = f", ~{elapsed / self.done * (self.total - self.done):.0f} s left"
        of = f"/{self.total}" if self.total else ""
        return f"[sweep] {self.done}{of} jobs done in {elapsed:.0f} s{left}{failed}; {best}"
