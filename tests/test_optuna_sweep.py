"""Optuna through Hydra's sweeper interface: failed trials don't stop a study; a killed study resumes."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import TINY, TINY_SHAPES, sweep_runs

pytestmark = pytest.mark.slow


def load_study(store, name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{store / 'optuna.db'}")


def test_a_failed_trial_is_recorded_and_the_study_goes_on(cli, store, mlflow_client):
    # grid over 3 depths; the network has fewer than 99 blocks, so that trial fails. VGG16: its blocks
    # trace in seconds (MobileNetV2's took ~20 s per trained depth)
    result = cli("train", "-m", *TINY, "backbone=vgg16", *TINY_SHAPES, "hparams_search=freeze_optuna",
                 "hydra.sweeper.sampler=grid", "freeze.n=choice(1,2,99)", "optimizer.lr=1e-3",
                 "trainer.isolate_sweep_jobs=false",
                 experiment="optuna_failing")  # jobs in one process: quicker; isolation is tested in test_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial" in result.stdout and "FAILED" in result.stdout

    study = load_study(store, "freeze-optuna_failing")
    states = {t.params["freeze.n"]: t.state.name for t in study.trials}
    assert states == {1: "COMPLETE", 2: "COMPLETE", 99: "FAIL"}
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert "freeze.n" in failed.user_attrs["error"]

    parents, children = sweep_runs(mlflow_client, "optuna_failing")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["failed_jobs"] == 1 and parent.data.metrics["jobs"] == 3
    by_depth = {c.data.params["freeze.n"]: c for c in children}
    assert sorted(by_depth) == ["1", "2", "99"]
    assert by_depth["99"].info.status == "FAILED" and "freeze.n" in by_depth["99"].data.tags["error"]
    assert all(by_depth[n].info.status == "FINISHED" for n in ("1", "2"))
    assert {c.data.tags["optuna.trial"] for c in children} == {str(t.number) for t in study.trials}
    assert failed.user_attrs["mlflow_run_id"] == by_depth["99"].info.run_id
    best = max(c.data.metrics["final_val_accuracy"] for c in children if "final_val_accuracy" in c.data.metrics)
    assert parent.data.metrics["best_final_val_accuracy"] == best == study.best_value
    # Optuna's own plots on the parent (importances need 3 complete trials); the sweep's progress lines
    plots = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "optuna_plots")}
    assert plots == {"optuna_plots/optimization_history.png", "optuna_plots/slice.png"}, plots
    assert "[sweep] 3/3 jobs done" in result.stdout and "1 failed; best final_val_accuracy" in result.stdout


def test_a_killed_study_resumes_where_it_stopped(store, cli, start_cli, mlflow_client):
    experiment, name = "optuna_resume", "head-optuna_resume"
    args = (["train", "-m", *TINY, *TINY_SHAPES, "hparams_search=head_optuna",
                        "hydra.sweeper.n_trials=3", "trainer.isolate_sweep_jobs=false"])
    # trials in one process (a few seconds each on cached features): SIGKILL takes them all down at once

    def running_children(name):
        if mlflow_client.get_experiment_by_name(name) is None:
            return []
        return [c for c in sweep_runs(mlflow_client, name)[1] if c.info.status == "RUNNING"]

    first = start_cli(args, store, experiment, new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
            if (store / "optuna.db").exists():
                try:
                    states = [t.state.name for t in load_study(store, name).trials]
                except KeyError:  # the study is not created yet
                    continue
                # killed in its 2nd trial, once that trial's MLflow run has started
                if states.count("COMPLETE") >= 1 and "RUNNING" in states and running_children(experiment):
                    break
        if first.poll() is not None:
            raise AssertionError("the sweep ended before it could be interrupted: " + first.communicate()[1][-2000:])
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # like a lost node or OOM-killer: no clean-up at all
        first.wait()
    before = load_study(store, name).trials
    assert sum(t.state.name == "COMPLETE" for t in before) >= 1

    second = cli(*args, experiment=experiment)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming study" in second.stdout

    after = load_study(store, name).trials
    assert len(after) > len(before)
    assert [t.number for t in after[:len(before)]] == [t.number for t in before]  # the same study, grown
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == 3  # n_trials counts the trials done before the kill
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params), "a resumed study repeated a trial"
    interrupted = [t for t in after if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state.name == "FAIL"
    for trial in interrupted:  # re-run with the same parameters
        assert any(t.user_attrs.get("retry_of") == trial.number and t.state.name == "COMPLETE" for t in after)

    parents, children = sweep_runs(mlflow_client, experiment)
    (parent,) = parents  # the resumed sweep kept its parent run
    assert parent.info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert sum(c.info.status == "FINISHED" for c in children) == 3
    assert sum(c.info.status == "KILLED" for c in children) == len(interrupted)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
