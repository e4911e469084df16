"""Stages, optimizers, compile and fit: small verb-named steps the train command composes."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import keras

from finetune import tracking
from finetune.config.schema import choice

# Validation/test pipelines drop undecodable files (ignore_errors), so their length is unknown to Keras,
# which then warns "Your input ran out of data" at the end of every validation pass: expected here. The
# training pipeline repeats, so it never runs out.
warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)


@dataclass
class Stage:
    name: str
    epochs: int
    policy: str
    n: int
    lr: float


def resolve_stages(cfg) -> list[Stage]:
    """The stages of a run: trainer.stages if given, else one stage from `freeze` and trainer.epochs."""
    base_policy, base_n, lr = choice(cfg.freeze.name), int(cfg.freeze.n), float(cfg.optimizer.lr)
    if not cfg.trainer.stages:
        return [Stage("train", int(cfg.trainer.epochs), base_policy, base_n, lr)]
    return [Stage(name=s.name, epochs=int(s.epochs),
                  policy=choice(s.freeze) if s.freeze is not None else base_policy,
                  n=int(s.n) if s.n is not None else base_n,
                  lr=lr * float(s.lr_scale))
            for s in cfg.trainer.stages]


def make_optimizer(cfg_opt, lr: float):
    kind = choice(cfg_opt.name)
    extra = {"clipnorm": cfg_opt.clipnorm} if cfg_opt.clipnorm else {}
    if kind == "adam":
        return keras.optimizers.Adam(learning_rate=lr, **extra)
    if kind == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg_opt.weight_decay, **extra)
    if kind == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=cfg_opt.momentum,
                                    nesterov=cfg_opt.nesterov, **extra)
    raise ValueError(f"Expected optimizer in adam, adamw, sgd. Received: {kind!r}")


def metric_objects(num_classes: int) -> list:
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


def compile_model(model, cfg_opt, lr: float, num_classes: int, jit_compile: bool = False) -> None:
    """(Re)compile: required after any change of `trainable` for it to take effect."""
    model.compile(optimizer=make_optimizer(cfg_opt, lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=metric_objects(num_classes), jit_compile=jit_compile)


def early_stopping(cfg_es) -> list:
    if not cfg_es.enabled:
        return []
    return [keras.callbacks.EarlyStopping(monitor=cfg_es.monitor, patience=cfg_es.patience,
                                          restore_best_weights=cfg_es.restore_best_weights)]


def fit_stage(model, train_ds, val_ds, *, first_epoch: int, epochs: int, callbacks: list,
              steps_per_epoch: int | None, verbose: int):
    """Fit one stage; epochs are numbered continuously across stages. Returns the History."""
    return model.fit(train_ds, validation_data=val_ds, initial_epoch=first_epoch,
                     epochs=first_epoch + epochs, callbacks=callbacks,
                     steps_per_epoch=steps_per_epoch, verbose=verbose,
                     shuffle=False)  # the pipeline shuffles; this only silences Keras


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Logs every epoch's metrics and learning rate at the global epoch (continuous across stages)."""

    def __init__(self, stage_index: int):
        super().__init__()
        self.stage_index = stage_index

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        metrics["stage"] = float(self.stage_index)
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is not None:
            metrics["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        tracking.log_metrics(metrics, step=epoch)  # journaled while a tracking server is away


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
