"""Hydra multirun -> one MLflow parent run for the sweep and one child run per job.

A Hydra callback (registered in conf/train.yaml under hydra.callbacks) creates the parent run before
any job starts. That also creates or migrates the MLflow store once, before parallel jobs could race on
it. The parent's id is written into the sweep folder, where every job (in this process or in a
launcher's worker) reads it to tag its own run with `mlflow.parentRunId`. A failed job ends the parent
FAILED at once, so no parent is left RUNNING when the sweep aborts; when all jobs are done the parent
gets the best child's objective and ends FINISHED.
"""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

PARENT_FILE = "mlflow_parent_run_id"
OBJECTIVE = "final_val_accuracy"


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


class MlflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        client, experiment_id = _client(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = list(OmegaConf.to_container(config.hydra.overrides.task))
        run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}",
                                tags={"finetune.sweep": "parent", "sweep_dir": str(sweep_dir.resolve()),
                                      "sweeper": str(config.hydra.sweeper.get("_target_", "")),
                                      "launcher": str(config.hydra.launcher.get("_target_", ""))})
        client.log_param(run.info.run_id, "sweep_overrides", " ".join(overrides)[:6000])
        client.log_param(run.info.run_id, "objective", OBJECTIVE)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)
        print(f"[finetune] MLflow parent run for this sweep: {run.info.run_id}")

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        multirun = str(config.hydra.mode).endswith("MULTIRUN")  # an enum, or its name
        parent = parent_run_id(config.hydra.sweep.dir) if multirun else None
        if parent and job_return.status == JobStatus.FAILED:
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
        if client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, status="FINISHED")
