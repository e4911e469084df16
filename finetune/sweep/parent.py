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

PARENT_FILE = "mlflow_parent_run_id"
from finetune.config.schema import OBJECTIVE_METRIC as OBJECTIVE
from finetune.tracking.store import RUN_ID_FILE  # noqa: F401 - where sweep callers looked for it
OPTUNA_SWEEPER = "hydra_plugins.finetune_optuna_sweeper."  # prefix of its _target_
STUDY_TAG = "optuna.study"


def parent_run_id(sweep_dir) -> str | None:
    """The sweep's parent run id, as the callback recorded it in the sweep folder."""
    path = Path(str(sweep_dir)) / PARENT_FILE
    return path.read_text().strip() if path.is_file() else None


def _client(config: DictConfig):
    import mlflow
    from mlflow import MlflowClient

    from finetune import tracking

    experiment_id = tracking.use_experiment(config.tracking)
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri()), experiment_id


def continues_after_failures(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).startswith(OPTUNA_SWEEPER)


def study_key(config: DictConfig) -> str | None:
    """`<storage>#<study name>` for an Optuna sweep with persistent storage (one that can resume)."""
    sweeper = config.hydra.sweeper
    if not continues_after_failures(config) or not sweeper.get("storage"):
        return None
    from finetune.sweep.optuna_study import storage_url

    return f"{storage_url(str(sweeper.storage))}#{sweeper.study_name}"


def end_parent(config: DictConfig, status: str, reason: str | None = None) -> None:
    """End the sweep's parent run now (FAILED / KILLED), saying why."""
    parent = parent_run_id(config.hydra.sweep.dir)
    if not parent:
        return
    client, _ = _client(config)
    if reason:
        client.set_tag(parent, "error", reason[:5000])
    client.set_terminated(parent, status=status)


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        client, experiment_id = _client(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = " ".join(OmegaConf.to_container(config.hydra.overrides.task))[:5000]
        key = study_key(config)
        resumed = self._resumable_parent(client, experiment_id, key) if key else None
        if resumed:
            run_id = resumed.info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resumed_in", str(sweep_dir.resolve()))
            client.set_tag(run_id, "resumed_overrides", overrides)
            for child in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}' "
                                            "and attributes.status = 'RUNNING'"):
                client.set_tag(child.info.run_id, "error", "interrupted: the sweep process stopped")
                client.set_terminated(child.info.run_id, status="KILLED")
            print(f"[finetune] resuming study {key.rsplit('#', 1)[1]!r}; MLflow parent run: {run_id}")
        else:
            run_id = self._new_parent(client, experiment_id, config, sweep_dir, overrides, key)
            print(f"[finetune] MLflow parent run for this sweep: {run_id}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(run_id)

    @staticmethod
    def _resumable_parent(client, experiment_id: str, key: str):
        found = client.search_runs([experiment_id], f"tags.`{STUDY_TAG}` = '{key}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None

    @staticmethod
    def _new_parent(client, experiment_id, config, sweep_dir: Path, overrides: str, key) -> str:
        from finetune.tracking.store import flatten

        sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=True, enum_to_str=True)
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True, enum_to_str=True)
        tags = {"finetune.sweep": "parent", "sweep_dir": str(sweep_dir.resolve()),
                "sweeper": str(sweeper.pop("_target_", "")), "launcher": str(launcher.get("_target_", ""))}
        if key:
            tags[STUDY_TAG] = key
        run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
        params = {"sweep_overrides": overrides, "objective": OBJECTIVE,
                  **{k: v[:6000] for k, v in flatten(sweeper, "sweeper.").items()}}
        for name, value in params.items():
            client.log_param(run.info.run_id, name, value)
        return run.info.run_id

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        multirun = str(config.hydra.mode).endswith("MULTIRUN")  # an enum, or its name
        if not multirun or job_return.status != JobStatus.FAILED or continues_after_failures(config):
            return
        parent = parent_run_id(config.hydra.sweep.dir)
        if parent:
            client, _ = _client(config)
            client.set_tag(parent, "failed_job", " ".join(job_return.overrides or [])[:5000])
            client.set_terminated(parent, status="FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        parent = parent_run_id(config.hydra.sweep.dir)
        if not parent:
            return
        client, experiment_id = _client(config)
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
        scored = [r for r in children if OBJECTIVE in r.data.metrics]
        if scored:
            best = max(scored, key=lambda r: r.data.metrics[OBJECTIVE])
            client.log_metric(parent, f"best_{OBJECTIVE}", best.data.metrics[OBJECTIVE])
            client.set_tag(parent, "best_run_id", best.info.run_id)
        client.log_metric(parent, "jobs", len(children))
        client.log_metric(parent, "failed_jobs", sum(r.info.status == "FAILED" for r in children))
        if client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, status="FINISHED")
