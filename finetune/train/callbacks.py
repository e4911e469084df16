"""What runs in a stage's fit: the learning-rate schedule (before every batch), then at every epoch end
the checkpoint, the MLflow metrics and early stopping."""
from __future__ import annotations

import math

import keras

from finetune import tracking


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Logs every epoch's metrics and learning rate at the global epoch (continuous across stages).
    `learning_rate` is the rate of the epoch's last optimizer update (the schedule sets it before each)."""

    def __init__(self, stage_index: int):
        super().__init__()
        self.stage_index = stage_index
        self.trainable = 0

    def on_train_begin(self, logs=None):
        self.trainable = sum(math.prod(w.shape) for w in self.model.trainable_weights)

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        metrics["stage"] = float(self.stage_index)
        metrics["params_trainable"] = float(self.trainable)  # the freeze plan per epoch (gradual unfreezing)
        lr = getattr(self.model.optimizer, "learning_rate", None)
        if lr is not None:
            metrics["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        tracking.log_metrics(metrics, step=epoch)  # journaled while a tracking server is away


class EpochCheckpoint(keras.callbacks.Callback):
    """At each epoch end, before the epoch's metrics go to MLflow: the run's checkpoint (weights,
    optimizer, history), so a kill at any later point loses nothing of this epoch."""

    def __init__(self, progress, stage_index: int, stage_first_epoch: int, schedule=None):
        super().__init__()
        self.progress, self.stage_index, self.stage_first_epoch = progress, stage_index, stage_first_epoch
        self.schedule = schedule  # its state (plateau's) is part of the checkpoint
        self.logs: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.logs.setdefault(key, []).append(float(value))
        self.progress.save(self.stage_index, epoch + 1, self.stage_first_epoch, self.logs, self.model.optimizer,
                           schedule=self.schedule.state() if self.schedule is not None else None)


def early_stopping(cfg_es) -> list:
    if not cfg_es.enabled:
        return []
    return [keras.callbacks.EarlyStopping(monitor=cfg_es.monitor, patience=cfg_es.patience,
                                          restore_best_weights=cfg_es.restore_best_weights)]


def stage_callbacks(cfg_trainer, stage_index: int, first_epoch: int, progress=None, schedule=None,
                    ema: bool = False) -> list:
    """In this order: the schedule (its epoch-end step before the checkpoint that saves its state), the
    EMA swap (validation runs on the moving average of the weights), checkpoint (when the run keeps
    them), MLflow metrics, early stopping."""
    checkpoint = ([EpochCheckpoint(progress, stage_index, first_epoch, schedule)]
                  if progress and progress.checkpoints else [])
    scheduled = [schedule] if schedule is not None else []
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=False)] if ema else []
    return [*scheduled, *swap, *checkpoint, MlflowEpochMetrics(stage_index),
            *early_stopping(cfg_trainer.early_stopping)]


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
