"""`finetune train`: dataset -> trained model + an MLflow run holding everything about it."""
from __future__ import annotations

from pathlib import Path

from finetune.config.schema import OBJECTIVE_METRIC
from finetune.tracking.scope import sweep_child_tags
from finetune.app.checks import validate_train


def run(cfg, output_dir: Path) -> dict:
    """Validate, load data, then train inside an MLflow run. Returns the final metrics.

    Alone, a bad config fails before any MLflow run exists. In a sweep, the job's run is started first,
    so a bad combination shows in the sweep as a FAILED child run with its params and the error.
    An interrupted run of the same config (killed, or SIGTERM) is continued: same run directory, same
    MLflow run, from its last completed epoch (trainer.resume)."""
    from finetune import tracking
    from finetune.app.signals import sigterm_raises
    from finetune.train import checkpoint, distribute

    distribution = distribute.start_early(cfg.trainer)  # multi_worker only
    cfg, output_dir, scratch = distribute.for_this_worker(cfg, output_dir, distribution)
    in_sweep = bool(sweep_child_tags())
    prepared = None if in_sweep else prepare(cfg)
    if cfg.trainer.dry_run:  # what the run would do: no MLflow run, nothing trained or written
        from finetune.train.dry_run import dry_run

        return dry_run(cfg, *(prepared or prepare(cfg)))
    key = checkpoint.config_hash(cfg)
    previous = find_interrupted(cfg, key, in_sweep=in_sweep)
    if previous:
        output_dir = Path(previous["out_dir"])
        print(f"continuing the interrupted run {previous['run_id']} in {output_dir} "
              "(trainer.resume=never starts a new run)")
    hint = (f"run the same command again (or trainer.resume={output_dir}) to continue from the last "
            "completed epoch")
    with sigterm_raises(), tracking.run(cfg, command="train", output_dir=output_dir, continue_hint=hint,
                                        resume_run_id=previous["run_id"] if previous else None) as active:
        if cfg.trainer.checkpoint and not in_sweep:
            checkpoint.record_run(key, output_dir, active.run_id)
        try:
            if prepared is None:
                prepared = _prepare_logged(cfg)
            resume = checkpoint.Checkpoints(output_dir).load() if previous else None
            if previous and resume is None:
                print(f"   the checkpoint in {output_dir} is unreadable: training again from the start")
            metrics = _train_in_run(cfg, *prepared, output_dir, resume)
            active.log_metrics({"process_rss_mb": tracking.process_rss_mb()})  # memory across sweep jobs
        except (Exception, SystemExit):  # failed: no continuing it (a kill keeps the checkpoint and index entry)
            checkpoint.forget_run(key)
            raise
        checkpoint.forget_run(key)
    distribute.leave_together(distribution)
    if scratch is not None:  # a multi-worker cluster's other worker: the chief has the run
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        print("\n== finetune train: done (this worker trained in step with the chief, whose run holds the results) ==")
        return metrics
    _print_summary(metrics, active.run_id, active.experiment_id, output_dir, active.uri)
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
    print(f"  model                    {model_shown(output_dir / 'model')}")
    print(f"  outputs                  {output_dir}")
    print(f"  look at it               {ui_hint(uri, experiment_id, run_id)}")


def model_shown(folder: Path) -> str:
    """The model file, or for a sweep job's deferred model the folder and when its model.keras appears."""
    from finetune.model import deferred

    if deferred.is_deferred(folder):
        return f"{folder} (head + backbone weights; model.keras is assembled when first loaded)"
    return str(folder / deferred.MODEL_FILE)


def objective(metrics: dict) -> float | None:
    """What a sweeper optimizes: the final validation accuracy."""
    return metrics.get(OBJECTIVE_METRIC)
