"""Stages: the plan of a run (what is frozen, for how many epochs, at which learning rate) and fitting one."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

from finetune.config.schema import choice


@dataclass
class Stage:
    name: str
    epochs: int
    policy: str
    n: int
    lr: float  # nan while optimizer.lr=auto has not been resolved by the range test
    lr_scale: float = 1.0

    def describe(self) -> str:
        return f"freeze={self.policy}" + (f" n={self.n}" if self.policy == "last_n" else "")


def plan_stages(cfg, base_lr: float | None = None) -> list[Stage]:
    """The stages of a run: trainer.stages if given, else one stage from `freeze` and trainer.epochs.
    `base_lr`: the rate the range test found for optimizer.lr=auto (until then each stage's lr is nan)."""
    lr = base_lr if base_lr is not None else cfg.optimizer.lr
    lr = float("nan") if str(lr) == "auto" else float(lr)
    base_policy, base_n = choice(cfg.freeze.name), int(cfg.freeze.n)
    if not cfg.trainer.stages:
        return [Stage("train", int(cfg.trainer.epochs), base_policy, base_n, lr)]
    return [Stage(name=s.name, epochs=int(s.epochs),
                  policy=choice(s.freeze) if s.freeze is not None else base_policy,
                  n=int(s.n) if s.n is not None else base_n,
                  lr=lr * float(s.lr_scale), lr_scale=float(s.lr_scale))
            for s in cfg.trainer.stages]


resolve_stages = plan_stages  # its earlier name


@contextlib.contextmanager
def expected_end_of_data():
    """Validation/test pipelines drop undecodable files (ignore_errors), so Keras does not know their
    length and warns "Your input ran out of data" at the end of every pass over them: expected here, and
    silenced only around these calls (the training pipeline repeats, so it never runs out)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        yield


def fit_stage(model, train_ds, val_ds, *, first_epoch: int, epochs: int, callbacks: list,
              steps_per_epoch: int | None, verbose: int, class_weight: dict | None = None):
    """Fit one stage; epochs are numbered continuously across stages. Returns the History."""
    with expected_end_of_data():
        return model.fit(train_ds, validation_data=val_ds, initial_epoch=first_epoch,
                         epochs=first_epoch + epochs, callbacks=callbacks, class_weight=class_weight,
                         steps_per_epoch=steps_per_epoch, verbose=verbose,
                         shuffle=False)  # the pipeline shuffles; this only silences Keras
