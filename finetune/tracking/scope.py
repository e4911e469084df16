"""One MLflow run scope for every command: `with tracking.run(cfg, command="extract", output_dir=out) as run:`.

The scope owns a command's whole MLflow lifecycle, so that a command only says what it records:

- where: the store and the experiment (tracking.uri, tracking.experiment). A server that cannot be
  reached before the run starts is one error line after about 3 s, not MLflow's 4 minutes of retries;
- which run: a new one; the interrupted run that train continues (`resume_run_id`); or another
  command's run that this one only adds to (`add_to_run_id`: evaluate and export into the model's
  training run, which keeps its status). In a Hydra multirun a new run is a child of the sweep's parent;
- the tags, in the scheme below, and the run id in `<output_dir>/mlflow_run_id` (for sweepers, scripts);
- every param, metric, tag and artifact, through the run's outage-safe Session (bounded calls, journal in
  the output dir, replay: finetune.tracking.outage), including the module-level finetune.tracking.log_*
  calls that the training code makes;
- the end: FINISHED after replaying what an outage held back; FAILED with an `error` tag on an exception;
  KILLED with an `error` tag on SIGTERM (finetune.app.signals.Terminated) or Ctrl-C, with one line that
  says so (and how to continue, where the command can).

Tag scheme (the README lists it too):
- `finetune.<key>`: where a run comes from, written by this scope only: `finetune.command`,
  `finetune.process_id`, `finetune.host`, `finetune.sweep` (`parent` or `child`), `finetune.sweep_job`,
  `finetune.sweep_overrides`, `finetune.model_ref` and `finetune.model_run_id` (evaluate, export).
  MLflow's own `mlflow.parentRunId` nests a child under its sweep's parent.
- `error`: why the run ended FAILED or KILLED. A command that only adds to another command's run tags a
  failure `<command>.error` there (`evaluate.error`) and leaves the run's status alone.
- Everything else is a result, named after the config group or command that produced it
  (`compute.reason`, `feature_cache`, `export.check`, `optuna.trial`, `best_run_id`).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.tracking import outage
from finetune.tracking.journal import JOURNAL_NAME, Journal
from finetune.tracking.store import (MAX_PARAM_KEY, RUN_ID_FILE, param_value, startup_call, tracking_uri,
                                     use_experiment)

COMMAND_TAG, PROCESS_TAG, HOST_TAG = "finetune.command", "finetune.process_id", "finetune.host"
SWEEP_TAG, SWEEP_JOB_TAG, SWEEP_OVERRIDES_TAG = "finetune.sweep", "finetune.sweep_job", "finetune.sweep_overrides"
MODEL_REF_TAG, MODEL_RUN_TAG = "finetune.model_ref", "finetune.model_run_id"
ERROR_TAG = "error"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's: the UI nests a child run under it
PARENT_FILE = "mlflow_parent_run_id"  # the sweep's parent run id, in the sweep folder
MAX_TAG = 5000


@dataclass
class Run:
    """A command's MLflow run, as the scope hands it out: ids, and logging through the run's Session."""

    run_id: str
    experiment_id: str
    uri: str
    command: str
    session: outage.Session
    owned: bool = True  # False: another command's run this one adds to (its status is left alone)
    summary: str | None = None  # what an outage kept from the server, said at the end (None: nothing)

    def log_params(self, params: dict) -> None:
        self.session.log_params({str(k)[:MAX_PARAM_KEY]: param_value(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.session.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict) -> None:
        self.session.set_tags({k: str(v)[:MAX_TAG] for k, v in tags.items()})

    def set_tag(self, key: str, value) -> None:
        self.set_tags({key: value})

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        """A file, or a folder (its contents go under artifact_path)."""
        self.session.log_artifact(local_path, artifact_path)

    def end(self, status: str = "FINISHED") -> str | None:
        """Replay what an outage held back, then end the run with `status` (a run this command only adds
        to keeps its own); returns the outage summary, if any."""
        self.summary = self.session.end(status if self.owned else None)
        return self.summary

    def stop(self, error: BaseException, continue_hint: str | None = None) -> None:
        """End the run because of `error`: KILLED for SIGTERM/Ctrl-C, FAILED for anything else."""
        killed = interrupted(error)
        what = ("interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt)
                else str(error) if killed else f"{type(error).__name__}: {error}")
        hint = f"; {continue_hint}" if killed and continue_hint else ""
        with contextlib.suppress(Exception):  # the error is what matters; a failed tag must not hide it
            self.set_tag(ERROR_TAG if self.owned else f"{self.command}.error", what + hint)
        self.end("KILLED" if killed else "FAILED")
        if killed:
            ended = f"The run {self.run_id} ended KILLED" if self.owned else f"The run {self.run_id} keeps its status"
            print(f"\nfinetune {self.command}: {what}. {ended}{hint}.", file=sys.stderr)
            with contextlib.suppress(AttributeError):
                error.run_ended = True  # said: the CLI need not say it again


def interrupted(error: BaseException) -> bool:
    """Ctrl-C (KeyboardInterrupt) and SIGTERM (finetune.app.signals.Terminated) are BaseExceptions that are
    not Exceptions, so that nothing catching Exception swallows them; such a stop ends a run KILLED."""
    return not isinstance(error, (Exception, SystemExit))


@contextlib.contextmanager
def run(cfg, command: str, *, output_dir, run_name: str | None = None, tags: dict | None = None,
        resume_run_id: str | None = None, add_to_run_id: str | None = None, continue_hint: str | None = None):
    """The scope of one command's MLflow run; yields a `Run`. See the module's docstring.

    run_name: the default name of a new run (tracking.run_name wins; a sweep job is "job <n>").
    tags: more tags for a new run. continue_hint: how to continue after a kill (train), for the
    `error` tag and the line printed."""
    active = open_run(cfg, command, output_dir=output_dir, run_name=run_name, tags=tags,
                      resume_run_id=resume_run_id, add_to_run_id=add_to_run_id)
    outage.make_current(active.session)
    try:
        yield active
    except BaseException as error:
        active.stop(error, continue_hint)
        raise
    else:
        active.end("FINISHED")
    finally:
        outage.make_current(None)


def open_run(cfg, command: str, *, output_dir, run_name: str | None = None, tags: dict | None = None,
             resume_run_id: str | None = None, add_to_run_id: str | None = None) -> Run:
    """Start (or continue, or join) the run; MLflow's active run unless it is another command's."""
    import mlflow

    uri = tracking_uri(cfg.tracking)
    if add_to_run_id:
        mlflow.set_tracking_uri(uri)
        info = run_info(uri, add_to_run_id)
        return _scoped(command, uri, info.run_id, info.experiment_id, output_dir, owned=False)
    experiment_id = use_experiment(cfg.tracking)
    if resume_run_id:
        started = startup_call(uri, mlflow.start_run, run_id=resume_run_id)
        scoped = _scoped(command, uri, started.info.run_id, started.info.experiment_id, output_dir)
        scoped.set_tags({PROCESS_TAG: os.getpid(), HOST_TAG: socket.gethostname()})
        return scoped
    sweep = sweep_child_tags()
    name = cfg.tracking.run_name or (f"job {sweep[SWEEP_JOB_TAG]}" if sweep else run_name)
    all_tags = run_tags(cfg, command, {**sweep, **(tags or {})})
    started = startup_call(uri, mlflow.start_run, experiment_id=experiment_id, run_name=name, tags=all_tags)
    return _scoped(command, uri, started.info.run_id, experiment_id, output_dir)


def run_tags(cfg, command: str, extra: dict) -> dict:
    """A new run's tags: the user's tracking.tags, then the scope's own (which a user tag cannot replace)."""
    return {**{str(k): str(v) for k, v in dict(cfg.tracking.tags or {}).items()}, COMMAND_TAG: command,
            PROCESS_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
            **{k: str(v)[:MAX_TAG] for k, v in extra.items()}}


def _scoped(command: str, uri: str, run_id: str, experiment_id: str, output_dir, owned: bool = True,
            id_file: str = RUN_ID_FILE) -> Run:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / id_file).write_text(run_id)
    journal = Journal(folder / JOURNAL_NAME, {"tracking_uri": uri, "run_id": run_id})
    session = outage.Session(run_id, uri, journal, hold_s=outage.HOLD_METRICS_S)
    return Run(run_id, str(experiment_id), uri, command, session, owned=owned)


def run_info(uri: str, run_id: str):
    """The RunInfo of an existing run (status, experiment), asked with the start-up bound."""
    from mlflow import MlflowClient

    return startup_call(uri, lambda: MlflowClient(tracking_uri=uri).get_run(run_id)).info


# -- sweeps: a child per job under one parent run ----------------------------------------------------------
def parent_run_id(sweep_dir) -> str | None:
    """The sweep's parent run id, as finetune.sweep.parent recorded it in the sweep folder."""
    path = Path(str(sweep_dir)) / PARENT_FILE
    return path.read_text().strip() if path.is_file() else None


def sweep_child_tags() -> dict:
    """In a Hydra multirun job: the child tags, with the parent run's id (so MLflow nests the run); else {}."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    parent = parent_run_id(hydra_cfg.sweep.dir)
    tags = {SWEEP_TAG: "child", SWEEP_JOB_TAG: str(hydra_cfg.job.num),
            SWEEP_OVERRIDES_TAG: " ".join(hydra_cfg.overrides.task)[:MAX_TAG]}
    return {**tags, PARENT_TAG: parent} if parent else tags


def open_sweep_parent(cfg, command: str, sweep_dir, *, run_name: str, tags: dict) -> Run:
    """A new parent run for a sweep: created through the client, never MLflow's active run (the jobs
    start theirs in this process or in workers), tagged `finetune.sweep=parent`, its id in PARENT_FILE."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg.tracking)
    experiment_id = use_experiment(cfg.tracking)
    all_tags = run_tags(cfg, command, {SWEEP_TAG: "parent", **tags})
    created = startup_call(uri, lambda: MlflowClient(tracking_uri=uri).create_run(
        experiment_id, run_name=run_name, tags=all_tags))
    return _scoped(command, uri, created.info.run_id, experiment_id, sweep_dir, id_file=PARENT_FILE)


def reopen_sweep_parent(cfg, command: str, sweep_dir, run_id: str | None = None,
                        running: bool = False) -> Run | None:
    """The sweep's parent (the one in the sweep folder, or `run_id`), to add to or to end; None if none.
    running: mark it RUNNING again (a resumed study's parent)."""
    from mlflow import MlflowClient

    run_id = run_id or parent_run_id(sweep_dir)
    if not run_id:
        return None
    uri = tracking_uri(cfg.tracking)
    experiment_id = use_experiment(cfg.tracking)
    if running:
        startup_call(uri, lambda: MlflowClient(tracking_uri=uri).update_run(run_id, status="RUNNING"))
    return _scoped(command, uri, run_id, experiment_id, sweep_dir, id_file=PARENT_FILE)
