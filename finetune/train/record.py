"""What a training run records, in its run folder and its MLflow run: the setup before training, each
stage's freeze plan, and at the end the model, the trained backbone and the plots."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from finetune import files, tracking
from finetune.tracking import mlflow_model
from finetune.tracking.scope import sweep_child_tags
from finetune.config.schema import choice
from finetune.model import backbone_pool, deferred
from finetune.model.freeze import format_plan, plan_json
from finetune.train import reports


@dataclass
class Setup:
    """What the run trains, as it is recorded (the image path and a features file describe it differently)."""
    backbone: str
    weights_source: str
    input_shape: tuple
    preprocess: str
    params_total: int
    compute: object  # finetune.train.compute.ComputeChoice


def weights_description(weights) -> str:
    """random, imagenet, preset (a KerasHub preset's own), or the file with the start of its sha256 (the exact
    weights a run started from)."""
    if weights is None:
        return "random"
    if weights in ("imagenet", "preset"):
        return str(weights)
    digest = hashlib.sha256(Path(weights).expanduser().read_bytes()).hexdigest()[:16]
    return f"file:{Path(weights).expanduser().resolve()} sha256:{digest}"


def record_setup(cfg, out: Path, dataset, setup: Setup) -> None:
    """The resolved config, the label map, the data and model facts as params, before any training."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    classes = list(dataset.class_names)
    tracking.log_params(tracking.flatten(resolved))
    tracking.log_params({
        "backbone": setup.backbone, "weights_source": setup.weights_source,
        "input_shape": list(setup.input_shape), "preprocess": setup.preprocess, "dataset": dataset.name,
        **{f"{split}_size": n for split, n in dataset.sizes().items()},
        "num_classes": len(classes), "class_names": ",".join(classes), "params_total": setup.params_total,
        "compute.precision": setup.compute.precision, "compute.jit_compile": setup.compute.jit_compile,
        **distribution_params(setup.compute.distribution),
    })
    tracking.set_tag("compute.reason", setup.compute.reason)
    record_lr_scaling(cfg)
    if cfg.optimizer.get("ema", False):  # which weights the validation metrics and the model are
        tracking.set_tag("optimizer.ema_weights", f"validation metrics and the saved model use the moving average "
                                                  f"of the weights (momentum {float(cfg.optimizer.ema_momentum):g})")
    print(f"   compute: {setup.compute.precision}, jit_compile={setup.compute.jit_compile} ({setup.compute.reason})")
    if setup.compute.distribution is not None:
        print(f"   distribution: {setup.compute.distribution.describe()}; global batch {cfg.trainer.batch_size}")
    (out / "label_map.json").write_text(json.dumps({
        "class_names": classes, "backbone": setup.backbone, "input_shape": list(setup.input_shape),
        "preprocess": setup.preprocess, "preprocessing_in_model": True, "input_range": [0, 255],
    }, indent=1))
    for name in ("config.yaml", "label_map.json", ".hydra/overrides.yaml"):
        if (out / name).exists():
            tracking.log_artifact(str(out / name))
    if getattr(dataset, "skipped", None):  # files the pre-flight scan left out (data.on_bad_file)
        (out / "skipped_files.json").write_text(json.dumps(dataset.skipped, indent=1))
        tracking.log_artifact(str(out / "skipped_files.json"))
        tracking.log_params({"skipped_files": len(dataset.skipped)})


def distribution_params(distribution) -> dict:
    """compute.strategy / compute.replicas (one device: none, 1)."""
    if distribution is None:
        return {"compute.strategy": "none", "compute.replicas": 1}
    return {"compute.strategy": distribution.name, "compute.replicas": distribution.replicas}


def record_lr_scaling(cfg) -> None:
    """optimizer.lr_scaling=linear: the rate the run uses, as the param optimizer.lr_scaled."""
    from finetune.train.stages import scaled_lr

    if choice(cfg.optimizer.get("lr_scaling", "none")) != "linear" or str(cfg.optimizer.lr) == "auto":
        return
    lr = scaled_lr(cfg)
    tracking.log_params({"optimizer.lr_scaled": f"{lr:.6g}"})
    print(f"   learning rate scaled linearly: {float(cfg.optimizer.lr):g} x {cfg.trainer.batch_size} / "
          f"{cfg.optimizer.lr_reference_batch} = {lr:.4g}")


def record_stage(cfg, out: Path, index: int, stage, plan, model, head_layers, backbone_name: str) -> None:
    """The stage's freeze plan (printed, a file, an artifact) and its params."""
    title = (f"freeze plan, stage {index + 1} '{stage.name}' ({backbone_name}, {stage.describe().replace(' ', ', ')}"
             f", batchnorm={choice(cfg.freeze.batchnorm)})")
    text = format_plan(plan, title)
    head = sum(int(np.prod(w.shape)) for layer in head_layers for w in layer.trainable_weights)
    text += f"\n  head: {head:,} trainable parameters"
    print(text)
    stem = f"freeze_plan_{index + 1}_{stage.name}"
    (out / f"{stem}.txt").write_text(text + "\n")
    (out / f"{stem}.json").write_text(plan_json(plan))
    tracking.log_artifact(str(out / f"{stem}.txt"), "freeze_plan")
    tracking.log_artifact(str(out / f"{stem}.json"), "freeze_plan")
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    record_stage_params(index, stage, trainable, int(model.count_params()) - trainable)


def record_stage_params(index: int, stage, trainable: int, frozen: int | None = None) -> None:
    prefix = f"stage{index + 1}"
    params = {f"{prefix}.name": stage.name, f"{prefix}.epochs": stage.epochs, f"{prefix}.freeze": stage.policy,
              f"{prefix}.n": stage.n, f"{prefix}.lr": stage.lr, f"{prefix}.params_trainable": trainable}
    if frozen is not None:
        params[f"{prefix}.params_frozen"] = frozen
    tracking.log_params(params)
    tracking.set_tag(prefix, stage.name)


def save_and_record(cfg, out: Path, model, backbone, progress, head_model=None) -> None:
    """The plots, the model folder (model.keras + label map + config: what predict/evaluate/export load),
    the trained backbone alone (reusable as backbone.weights=<file>), the same model in MLflow's format
    (mlflow_model/: `mlflow models serve`, pyfunc; a sweep's jobs leave it to `finetune compare
    compare.register=...`, which adds it to the best run) and the registry entry (of that MLflow model).

    `head_model`: the head over the backbone's features, when only it trained. A sweep's job then writes
    the head and the backbone's weights instead of model.keras (finetune.model.deferred), which is
    assembled when the model is first loaded, and by the sweep for its best job."""
    reports.plot_training_curves(progress.history, progress.stage_starts, out / "training_curves.png")
    for name in ("confusion_matrix.png", "confusion_matrix.csv", "training_curves.png", "metrics.json"):
        tracking.log_artifact(str(out / name))
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    backbone_pool.save_weights(backbone, out / "backbone.weights.h5", files.save_weights)  # once per kept backbone
    if defers_model(cfg, head_model):
        deferred.write(model_dir, head_model, out / "backbone.weights.h5")
    else:
        files.save_model(model, model_dir / "model.keras")
    for name in ("label_map.json", "config.yaml"):
        (model_dir / name).write_bytes((out / name).read_bytes())
    if not cfg.tracking.log_model:
        return
    tracking.log_artifact(str(model_dir), "model")
    tracking.log_artifact(str(out / "backbone.weights.h5"), "backbone")
    if cfg.tracking.register_model or not sweep_child_tags():  # a sweep's jobs: when asked (compare.register)
        served = mlflow_model.write(model_dir, out / mlflow_model.FOLDER)  # the same model in MLflow's format
        tracking.log_artifact(str(served), mlflow_model.FOLDER)
    if cfg.tracking.register_model:
        version = tracking.register_model(cfg.tracking.register_model, mlflow_model.FOLDER)
        print(f"   registered as models:/{cfg.tracking.register_model}/{version}" if version
              else "   model registration kept for later (tracking server unreachable)")


def defers_model(cfg, head_model) -> bool:
    """Whether this run writes its model deferred: a sweep's job that trained a head alone, whose model
    is not registered now."""
    return head_model is not None and bool(sweep_child_tags()) and not cfg.tracking.register_model
