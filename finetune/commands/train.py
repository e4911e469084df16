"""`finetune train`: dataset -> trained model + an MLflow run holding everything about it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune.config.schema import OBJECTIVE_METRIC
from finetune.tracking.store import RUN_ID_FILE
from finetune.app.checks import validate_train


def run(cfg, output_dir: Path) -> dict:
    """Validate, load data, then train inside an MLflow run. Returns the final metrics.

    Alone, a bad config fails before any MLflow run exists. In a sweep, the job's run is started first,
    so a bad combination shows in the sweep as a FAILED child run with its params and the error.
    An interrupted run of the same config (killed, or SIGTERM) is continued: same run directory, same
    MLflow run, from its last completed epoch (trainer.resume)."""
    from finetune import tracking
    from finetune.train import checkpoint
    from finetune.app.signals import Terminated, sigterm_raises
    import mlflow

    tags = sweep_tags()
    prepared = None if tags else prepare(cfg)
    key = checkpoint.config_hash(cfg)
    previous = find_interrupted(cfg, key, in_sweep=bool(tags))
    experiment_id = tracking.use_experiment(cfg.tracking)
    if previous:
        output_dir = Path(previous["out_dir"])
        print(f"continuing the interrupted run {previous['run_id']} in {output_dir} "
              "(trainer.resume=never starts a new run)")
        start = {"run_id": previous["run_id"]}
    else:
        run_name = cfg.tracking.run_name or (f"job {tags['sweep_job']}" if tags else None)
        start = {"experiment_id": experiment_id, "run_name": run_name, "tags": {**tags, **dict(cfg.tracking.tags)}}
    with sigterm_raises(), mlflow.start_run(**start) as active:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / RUN_ID_FILE).write_text(active.info.run_id)  # for sweepers and scripts
        tracking.start_session(active.info.run_id, output_dir)  # logging that survives a server outage
        tracking.set_tag("process_id", str(os.getpid()))  # sweep jobs: which shared a process
        if cfg.trainer.checkpoint and not tags:
            checkpoint.record_run(key, output_dir, active.info.run_id)
        try:
            if prepared is None:
                prepared = _prepare_logged(cfg)
            resume = checkpoint.Checkpoints(output_dir).load() if previous else None
            if previous and resume is None:
                print(f"   the checkpoint in {output_dir} is unreadable: training again from the start")
            metrics = _train_in_run(cfg, *prepared, output_dir, resume)
            tracking.log_metrics({"process_rss_mb": tracking.process_rss_mb()})  # memory across sweep jobs
        except (Terminated, KeyboardInterrupt) as stop:  # keep the checkpoint and the index entry
            what = stop if isinstance(stop, Terminated) else "interrupted (Ctrl-C)"
            tracking.set_tag("error", f"{what}; the same command continues it")
            tracking.end_run("KILLED")
            print(f"\nfinetune train: {what}. The run {active.info.run_id} ended KILLED; run the same command "
                  f"again (or trainer.resume={output_dir}) to continue from the last completed epoch.",
                  file=sys.stderr)
            raise
        except BaseException as error:  # the run ends FAILED; say why on the run itself
            tracking.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            tracking.end_run("FAILED")
            checkpoint.forget_run(key)
            raise
        checkpoint.forget_run(key)
        tracking.end_run("FINISHED")  # replays what an outage held back, ends the run, says what was lost
        run_id = active.info.run_id
    _print_summary(metrics, run_id, experiment_id, output_dir, tracking.tracking_uri(cfg.tracking))
    return metrics


def find_interrupted(cfg, key: str, in_sweep: bool) -> dict | None:
    """{"out_dir", "run_id"} of the run to continue, or None for a new run."""
    import json

    from finetune.train import checkpoint
    from finetune.errors import ConfigError

    mode = str(cfg.trainer.resume)
    if mode.lower() in ("never", "false", "off", "none"):
        return None
    if mode.lower() == "auto":
        return None if in_sweep else checkpoint.interrupted_run(key)
    folder = Path(mode).expanduser()
    state_file = folder / checkpoint.FOLDER / checkpoint.STATE_FILE
    expected = ("auto, never, or the run directory of an interrupted `finetune train` (it holds "
                f"{checkpoint.FOLDER}/{checkpoint.STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        raise ConfigError("trainer.resume", mode, expected) from None
    if state.get("config_hash") != key:
        raise ConfigError("trainer.resume", mode, "a run trained with this same config (its config.yaml); "
                          "run with the overrides it was started with")
    return {"out_dir": str(folder.resolve()), "run_id": state["run_id"]}


def prepare(cfg):
    """(backbone spec, dataset) after the cross-field checks; dataset is None for data=features."""
    spec = validate_train(cfg)
    from finetune.data import load_dataset  # pure Python for generated/folder data: no TF yet

    dataset = None if cfg.data.source == "features" else load_dataset(cfg.data)
    if dataset is None:
        from finetune.features.extract import read_features

        read_features(cfg.data.path)  # a missing/wrong folder fails here, before training
    return spec, dataset


def _prepare_logged(cfg):
    """prepare() inside a sweep job's run: if the combination is bad, the run still shows its params."""
    try:
        return prepare(cfg)
    except Exception:
        from omegaconf import OmegaConf

        from finetune import tracking

        tracking.log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
        raise


def sweep_tags() -> dict:
    """In a Hydra multirun: the parent run's id (so MLflow nests this run) and the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from finetune.sweep.parent import parent_run_id

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    parent = parent_run_id(hydra_cfg.sweep.dir)
    tags = {"finetune.sweep": "child", "sweep_job": str(hydra_cfg.job.num),
            "sweep_overrides": " ".join(hydra_cfg.overrides.task)[:5000]}
    return {**tags, "mlflow.parentRunId": parent} if parent else tags


def _train_in_run(cfg, spec, dataset, output_dir: Path, resume: dict | None = None) -> dict:
    if dataset is None:
        from finetune.train.run import train_on_feature_file

        return train_on_feature_file(cfg, output_dir)
    from finetune.train.run import train_on_images

    return train_on_images(cfg, spec, dataset, output_dir, resume=resume)


def _print_summary(metrics, run_id, experiment_id, output_dir, uri) -> None:
    from finetune.tracking.store import ui_hint

    shown = {k: v for k, v in metrics.items() if k.startswith(("test_", "final_val_"))
             and not any(t in k for t in ("precision_", "recall_", "f1_"))}
    print("\n== finetune train: done ==")
    for key, value in sorted(shown.items()):
        print(f"  {key:<24} {value:.4f}")
    print(f"  run id                   {run_id}")
    print(f"  model                    {output_dir / 'model' / 'model.keras'}")
    print(f"  outputs                  {output_dir}")
    print(f"  look at it               {ui_hint(uri, experiment_id, run_id)}")


def objective(metrics: dict) -> float | None:
    """What a sweeper optimizes: the final validation accuracy."""
    return metrics.get(OBJECTIVE_METRIC)
