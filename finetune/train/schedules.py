"""Learning-rate schedules (the `schedule` group), applied per stage over that stage's optimizer updates.

    lr(s) for update s = 0, 1, ... T-1 of a stage (T = epochs x updates per epoch), base rate r (the
    stage's: optimizer.lr x lr_scale), W warmup updates (schedule.warmup_epochs x updates per epoch):

    warmup (s < W, every schedule but one_cycle)  r * (s + 1) / W
    constant                                      r
    cosine                                        r * (m + (1 - m) * (1 + cos(pi * p)) / 2), p = (s - W) / (T - W)
    step                                          r * gamma ** floor(s / (every_epochs x updates per epoch))
    plateau                                       r * f, f *= factor after `patience` epochs without a better
                                                  `monitor`, never below m (counted from the end of warmup)
    one_cycle                                     cosine from r / div_factor up to r over the first
                                                  pct_start of T, then cosine down to r * m

    m = schedule.min_lr_ratio. With gradient accumulation an update is accumulate_steps batches.

Keras' ReduceLROnPlateau refuses an optimizer whose rate is a schedule, and a LearningRateSchedule is
called with micro-batch counts under gradient accumulation; so the rate is a plain variable that
`ScheduleCallback` sets before every batch from the formula above (`rate`, pure Python, what the tests
check). The position in the schedule is the epoch and batch Keras passes in (a resumed stage restarts at
its epoch); plateau's state (factor, best value, wait count) is part of the run's checkpoint.

In MLflow, `learning_rate` (per epoch) is the rate of the epoch's last update, and
`learning_rate_per_update` has every update's rate, sent once per epoch in one call: its step is the
update's index in the stage plus the stage's first epoch x updates per epoch (the run's update count
when every stage has the same batches per epoch, as stages on one dataset do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from finetune.config.schema import choice
from finetune.registry import lookup


@dataclass(frozen=True)
class StagePlan:
    """What a schedule knows of its stage."""
    lr: float  # the stage's base rate
    epochs: int
    updates_per_epoch: int

    @property
    def total(self) -> int:
        return max(1, self.epochs * self.updates_per_epoch)


def warmup_updates(cfg, plan: StagePlan) -> int:
    return min(plan.total, int(round(float(cfg.warmup_epochs) * plan.updates_per_epoch)))


def _constant(cfg, plan, s, scale):
    return plan.lr


def _cosine(cfg, plan, s, scale):
    warm = warmup_updates(cfg, plan)
    p = min(1.0, (s - warm) / max(1, plan.total - warm))
    m = float(cfg.min_lr_ratio)
    return plan.lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _step(cfg, plan, s, scale):
    return plan.lr * float(cfg.gamma) ** (s // max(1, int(cfg.every_epochs) * plan.updates_per_epoch))


def _plateau(cfg, plan, s, scale):
    return plan.lr * scale


def _one_cycle(cfg, plan, s, scale):
    rise = max(1, int(round(float(cfg.pct_start) * plan.total)))
    low, m = plan.lr / float(cfg.div_factor), float(cfg.min_lr_ratio)
    if s < rise:
        return low + (plan.lr - low) * 0.5 * (1.0 - math.cos(math.pi * s / rise))
    p = min(1.0, (s - rise) / max(1, plan.total - rise))
    return plan.lr * (m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p)))


# schedule.name -> (cfg, plan, update index, plateau factor) -> learning rate after warmup
SCHEDULES = {"constant": _constant, "cosine": _cosine, "step": _step, "plateau": _plateau,
             "one_cycle": _one_cycle}
OWN_WARMUP = {"one_cycle"}  # its rise is its warmup


def rate(cfg, plan: StagePlan, s: int, scale: float = 1.0) -> float:
    """The learning rate of update `s` of a stage (see the module docstring)."""
    name = choice(cfg.name)
    warm = warmup_updates(cfg, plan)
    if name not in OWN_WARMUP and s < warm:
        return plan.lr * (s + 1) / warm
    return float(lookup(SCHEDULES, "schedule", name)(cfg, plan, s, scale))


def describe(cfg) -> str:
    name = choice(cfg.name)
    extra = {"cosine": f" to x{float(cfg.min_lr_ratio):g}",
             "step": f" x{float(cfg.gamma):g} every {int(cfg.every_epochs)} epoch(s)",
             "plateau": f" x{float(cfg.factor):g} after {int(cfg.patience)} epoch(s) without a better {cfg.monitor}",
             "one_cycle": f" from /{float(cfg.div_factor):g}, peak at {float(cfg.pct_start):g}"}.get(name, "")
    warm = f", {float(cfg.warmup_epochs):g} warmup epoch(s)" if float(cfg.warmup_epochs) and name not in OWN_WARMUP else ""
    return f"schedule={name}{extra}{warm}"


class ScheduleCallback(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every batch of a stage; plateau's reductions at epoch ends.

    `first_epoch`: the stage's first epoch in the run's numbering (Keras passes run epochs); `accumulate`:
    batches per optimizer update. `steps` collects (update index, rate) once per update, for the record."""

    def __init__(self, cfg, plan: StagePlan, first_epoch: int, batches_per_epoch: int, accumulate: int = 1,
                 state: dict | None = None):
        super().__init__()
        self.cfg, self.plan, self.first_epoch = cfg, plan, int(first_epoch)
        self.batches_per_epoch, self.accumulate = int(batches_per_epoch), max(1, int(accumulate))
        self.name = choice(cfg.name)
        state = state or {}
        self.scale = float(state.get("scale", 1.0))
        self.best = state.get("best")
        self.wait = int(state.get("wait", 0))
        self.epoch = self.first_epoch
        self.steps: list[tuple[int, float]] = []
        self.logged = 0  # how many of `steps` went to MLflow

    def state(self) -> dict:
        """What a resumed stage needs to continue this schedule exactly (JSON)."""
        return {"scale": self.scale, "best": self.best, "wait": self.wait}

    def update_index(self, epoch: int, batch: int) -> int:
        return ((epoch - self.first_epoch) * self.batches_per_epoch + batch) // self.accumulate

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = int(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        s = self.update_index(self.epoch, int(batch))
        lr = rate(self.cfg, self.plan, s, self.scale)
        if not self.steps or self.steps[-1][0] != s:
            if not self.steps or self.steps[-1][1] != lr:  # a constant rate is set once (each set is an op)
                self.model.optimizer.learning_rate = lr
            self.steps.append((s, lr))

    def on_epoch_end(self, epoch, logs=None):
        from finetune import tracking

        offset = self.first_epoch * self.plan.updates_per_epoch
        tracking.log_series("learning_rate_per_update", [(offset + s, lr) for s, lr in self.steps[self.logged:]])
        self.logged = len(self.steps)
        if self.name != "plateau":
            return
        if (int(epoch) + 1 - self.first_epoch) * self.plan.updates_per_epoch <= warmup_updates(self.cfg, self.plan):
            return  # still warming up: nothing to compare yet
        value = (logs or {}).get(self.cfg.monitor)
        if value is None:
            return
        value = float(value)
        lower_is_better = "loss" in str(self.cfg.monitor)
        improved = self.best is None or (value < self.best - float(self.cfg.min_delta) if lower_is_better
                                         else value > self.best + float(self.cfg.min_delta))
        if improved:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= int(self.cfg.patience):
            self.scale = max(self.scale * float(self.cfg.factor), float(self.cfg.min_lr_ratio))
            self.wait = 0
