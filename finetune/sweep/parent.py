"""Hydra multirun -> one MLflow parent run for the sweep and one child run per job.

A Hydra callback (registered in conf/train.yaml under hydra.callbacks) creates the parent run before
any job starts. That also creates or migrates the MLflow store once, before parallel jobs could race on
it. The parent's id is written into the sweep folder, where every job (in this process or in a
launcher's worker) reads it to tag its own run with `mlflow.parentRunId`.

Hydra's basic sweeper stops at a failed job: the parent then ends FAILED at once, so no parent is left
RUNNING. The Optuna sweeper goes on past failed trials; it ends the parent itself if it has to stop.
An Optuna study that is resumed (same storage and study name) keeps its parent run: the new jobs
join the same parent, and children a killed sweep left RUNNING are marked KILLED.
When all jobs are done the parent gets the best child's objective and ends FINISHED.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.config.schema import OBJECTIVE_METRIC as OBJECTIVE
OPTUNA_SWEEPER = "hydra_plugins.finetune_optuna_sweeper."  # prefix of its _target_
STUDY_TAG = "optuna.study"
OPTUNA_PLOTS = "optuna_plots"  # the sweep folder's Optuna plots, logged to the parent under this name


def __getattr__(name: str):
    """PARENT_FILE, parent_run_id, RUN_ID_FILE: where sweep callers looked for them, imported when asked.
    Hydra builds this callback for every train command, single runs and dry runs too: importing the
    tracking modules here would import MLflow (~1.5 s) into commands that never use it."""
    if name in ("PARENT_FILE", "parent_run_id"):
        from finetune.tracking import scope

        return getattr(scope, name)
    if name == "RUN_ID_FILE":
        from finetune.tracking.store import RUN_ID_FILE

        return RUN_ID_FILE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command(config: DictConfig) -> str:
    return str(config.hydra.job.name)


def _parent(config: DictConfig, run_id: str | None = None, running: bool = False):
    """The sweep's parent run through the run scope's pieces (outage-safe logging), or None."""
    from finetune.tracking.scope import reopen_sweep_parent

    return reopen_sweep_parent(config, _command(config), config.hydra.sweep.dir, run_id, running=running)


def _client(config: DictConfig):
    """A client for reading the sweep's runs (children, an earlier study's parent)."""
    from mlflow import MlflowClient

    from finetune import tracking

    experiment_id = tracking.use_experiment(config.tracking)
    return MlflowClient(tracking_uri=tracking.tracking_uri(config.tracking)), experiment_id


def process_gone(tags: dict) -> bool:
    """A RUNNING child whose process is gone (on this host; unknown host or pid: gone, as before)."""
    import os
    import socket

    from finetune.tracking.scope import HOST_TAG, PROCESS_TAG

    host, pid = tags.get(HOST_TAG), tags.get(PROCESS_TAG, "")
    if host is None or not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()


def continues_after_failures(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).startswith(OPTUNA_SWEEPER)


def study_key(config: DictConfig) -> str | None:
    """`<storage>#<study name>` for an Optuna sweep with persistent storage (one that can resume)."""
    sweeper = config.hydra.sweeper
    if not continues_after_failures(config) or not sweeper.get("storage"):
        return None
    from finetune.sweep.optuna_study import storage_url
    from finetune.sweep.shared_study import redact

    return f"{redact(storage_url(str(sweeper.storage)))}#{sweeper.study_name}"


def end_parent(config: DictConfig, status: str, reason: str | None = None) -> None:
    """End the sweep's parent run now (FAILED / KILLED), saying why."""
    parent = _parent(config)
    if parent is None:
        return
    if reason:
        parent.set_tag("error", reason)
    parent.end(status)


def assemble_best(client, run_id: str, sweep_dir: Path) -> None:
    """The best job's model.keras when the job deferred it (finetune.model.deferred): assembled in its
    folder and added to its run's `model/` artifact, so that the model a user loads next is whole."""
    from finetune.model import deferred
    from finetune.tracking.store import RUN_ID_FILE

    for id_file in sorted(sweep_dir.glob(f"*/{RUN_ID_FILE}")):
        folder = id_file.parent / "model"
        if id_file.read_text().strip() != run_id or not deferred.is_deferred(folder):
            continue
        model = deferred.assemble(folder)
        print(f"best job's model: {model} (assembled from its head and backbone weights)")
        try:
            client.log_artifact(run_id, str(model), "model")
        except Exception as error:  # noqa: BLE001 - the store is down: the file is there, loaders find it
            print(f"could not add it to run {run_id}'s model/ artifact ({type(error).__name__}); loading "
                  "that run's model assembles it again")


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import os

        from finetune.sweep.progress import SweepProgress, expected_jobs

        # drawn by this process only: a launcher's workers (joblib, SLURM) call on_job_end in their own
        self.progress, self.pid = SweepProgress(expected_jobs(config), OBJECTIVE), os.getpid()
        client, experiment_id = _client(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task))[:5000]
        key = study_key(config)
        resumed = self._resumable_parent(client, experiment_id, key) if key else None
        if not resumed:
            parent = self._new_parent(config, sweep_dir, overrides, key)
            first = self._resumable_parent(client, experiment_id, key, oldest=True) if key else None
            if first is None or first.info.run_id == parent.run_id:
                print(f"[finetune] MLflow parent run for this sweep: {parent.run_id}")
                parent.end(None)  # sends what an outage held back; the parent stays RUNNING until the sweep ends
                return
            client.delete_run(parent.run_id)  # another process on this study made its parent first: join it
            resumed = first
        parent = _parent(config, resumed.info.run_id, running=True)
        parent.set_tags({"resumed_in": str(sweep_dir.resolve()), "resumed_overrides": overrides})
        for child in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' "
                                        "and attributes.status = 'RUNNING'"):
            if process_gone(child.data.tags):  # children of other live sweep processes go on
                client.set_tag(child.info.run_id, "error", "interrupted: the sweep process stopped")
                client.set_terminated(child.info.run_id, status="KILLED")
        print(f"[finetune] resuming study {key.rsplit('#', 1)[1]!r}; MLflow parent run: {parent.run_id}")
        parent.end(None)  # sends what an outage held back; the parent stays RUNNING until the sweep ends

    @staticmethod
    def _resumable_parent(client, experiment_id: str, key: str, oldest: bool = False):
        found = client.search_runs([experiment_id], f"tags.`{STUDY_TAG}` = '{key}'",
                                   order_by=[f"attributes.start_time {'ASC' if oldest else 'DESC'}"], max_results=1)
        return found[0] if found else None

    @staticmethod
    def _new_parent(config, sweep_dir: Path, overrides: str, key):
        from finetune.tracking.scope import open_sweep_parent
        from finetune.tracking.store import flatten

        from finetune.sweep.shared_study import redact

        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True, enum_to_str=True)
        if sweeper.get("storage"):
            sweeper["storage"] = redact(str(sweeper["storage"]))
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True, enum_to_str=True)
        tags = {"sweep_dir": str(sweep_dir.resolve()), "sweeper": str(sweeper.pop("_target_", "")),
                "launcher": str(launcher.get("_target_", ""))}
        if key:
            tags[STUDY_TAG] = key
        parent = open_sweep_parent(config, _command(config), sweep_dir, run_name=f"sweep {sweep_dir.name}", tags=tags)
        parent.log_params({"sweep_overrides": overrides, "objective": OBJECTIVE, **flatten(sweeper, "sweeper.")})
        return parent

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        import os

        from hydra.core.utils import JobStatus

        multirun = str(config.hydra.mode).endswith("MULTIRUN")  # an enum, or its name
        if multirun and getattr(self, "pid", None) == os.getpid():
            failed = job_return.status == JobStatus.FAILED
            value = None if failed else job_return.return_value
            self.progress.job_done(config.hydra.job.get("num"), value if isinstance(value, (int, float)) else None,
                                   failed)
        if not multirun or job_return.status != JobStatus.FAILED or continues_after_failures(config):
            return
        parent = _parent(config)
        if parent is not None:
            parent.set_tag("failed_job", " ".join(job_return.overrides or []))
            parent.end("FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        parent = _parent(config)
        if parent is None:
            return
        client, experiment_id = _client(config)
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
        scored = [r for r in children if OBJECTIVE in r.data.metrics]
        if scored:
            best = max(scored, key=lambda r: r.data.metrics[OBJECTIVE])
            parent.log_metrics({f"best_{OBJECTIVE}": best.data.metrics[OBJECTIVE]})
            parent.set_tag("best_run_id", best.info.run_id)
            assemble_best(client, best.info.run_id, Path(str(config.hydra.sweep.dir)))
        parent.log_metrics({"jobs": len(children), "failed_jobs": sum(r.info.status == "FAILED" for r in children)})
        for plot in sorted((Path(str(config.hydra.sweep.dir)) / OPTUNA_PLOTS).glob("*.png")):  # Optuna's plots
            parent.log_artifact(plot, OPTUNA_PLOTS)
        still_running = client.get_run(parent.run_id).info.status == "RUNNING"
        parent.end("FINISHED" if still_running else None)
