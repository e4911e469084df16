"""Sweep trials that differ only in the learning rate train one traced head.

Keras traces a new head's train and test steps at its first fit: ~0.45 s here, twice what 5 epochs of a
small head on cached features take. In a sweep's process, a trial whose config differs from the one
before only in `optimizer.lr` (a grid over learning rates) gets that trial's head back: the same layers
and compiled model with its traced steps, its weights and optimizer state set back to the values they
had before the first trial trained them, and the new rate. Those are the values a fresh build gives:
the head is built right after the random state is reset to trainer.seed (build_parts' head_seed), so it
starts the same either way, Dropout's random state included (tests/test_sweep.py compares a reused
trial with the same run on its own). Anything else differs -> a new head, as before.

Applies to a run that trains a head alone on cached features with a kept backbone (train.run.shared_backbone),
in one stage, not resumed, with a numeric optimizer.lr. One head is kept per process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class Kept:
    key: str
    layers: list  # the head's layers (Parts.head)
    model: object  # the compiled head on features
    start: list  # the model's variables before training
    optimizer_start: list  # the optimizer's, built, before training


_kept: Kept | None = None
REUSED = "head and traced train step reused"  # the line a reusing run prints starts with it


def key_of(cfg, shared_key: str | None, num_classes: int, stages: int) -> str | None:
    """What decides the head and its traced steps: the whole config but optimizer.lr and tracking, the
    kept backbone and the classes. None: this run builds its own head."""
    from omegaconf import OmegaConf

    if shared_key is None or stages != 1 or str(cfg.data.get("source", "")) == "features":
        return None
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    lr = config.get("optimizer", {}).pop("lr", None)
    if not isinstance(lr, (int, float)):  # optimizer.lr=auto: the range test trains the head first
        return None
    config.pop("tracking", None)
    return json.dumps([config, shared_key, num_classes], sort_keys=True, default=str)


def kept_layers(key: str | None) -> list | None:
    """The kept head's layers when `key` is the kept one's, else None (and nothing is kept any more)."""
    global _kept
    if key is not None and _kept is not None and _kept.key == key:
        return _kept.layers
    _kept = None
    return None


def kept_model(key: str | None, layers: list):
    """The compiled head model kept for `key` over these `layers`, else None."""
    if key is None or _kept is None or _kept.key != key or _kept.layers is not layers:
        return None
    return _kept.model


def keep(key: str, layers: list, model) -> None:
    """Remember a compiled head model (optimizer built, nothing trained yet) and its starting values."""
    global _kept
    _kept = Kept(key, layers, model, [np.array(v.numpy()) for v in model.variables],
                 [np.array(v.numpy()) for v in model.optimizer.variables])


def restart(model, lr: float) -> None:
    """The kept model's weights and optimizer state as before its first training, at rate `lr`. (Both
    variable lists are fixed once built: Keras keeps metric variables apart; strict: a mismatch raises.)"""
    for variable, value in zip(model.variables, _kept.start, strict=True):
        variable.assign(value)
    for variable, value in zip(model.optimizer.variables, _kept.optimizer_start, strict=True):
        variable.assign(value)
    model.optimizer.learning_rate = lr
