"""Stages: the plan of a run (what is frozen, for how many epochs, at which learning rate) and fitting one."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace

from finetune.config.schema import choice


@dataclass
class Stage:
    name: str
    epochs: int
    policy: str
    n: int
    lr: float  # nan while optimizer.lr=auto has not been resolved by the range test
    lr_scale: float = 1.0
    # a phase of a gradual stage: its epochs before this phase, and the whole stage's epochs (the
    # schedule spans the whole stage); a plain stage: 0 and None
    schedule_offset: int = 0
    schedule_epochs: int | None = None

    def describe(self) -> str:
        return f"freeze={self.policy}" + (f" n={self.n}" if self.policy == "last_n" else "")


def gradual_phases(stage: Stage, every: int, steps: list[int]) -> list[Stage]:
    """freeze=gradual: the head alone for `every` epochs, then one more block of the block map (counted from
    the top) every `every` epochs; `steps`: the last_n values that each add a block with weights (a
    weightless block, such as a pooling top, is no step of its own), capped by freeze.max_blocks. The
    last phase takes the epochs left. Each phase is a stage of its own (recompiled: a fresh optimizer;
    recorded) whose schedule continues the stage's."""
    phases, done = [], 0
    for k, n in enumerate([0, *steps]):
        if done >= stage.epochs:
            break
        last = k == len(steps)
        epochs = stage.epochs - done if last else min(every, stage.epochs - done)
        phases.append(replace(stage, name=f"{stage.name}_top{k}", epochs=epochs, policy="last_n" if n else "all",
                              n=n, schedule_offset=done, schedule_epochs=stage.epochs))
        done += epochs
    return phases


def plan_stages(cfg, base_lr: float | None = None, unfreeze_steps: list[int] | None = None) -> list[Stage]:
    """The stages of a run: trainer.stages if given, else one stage from `freeze` and trainer.epochs; a
    gradual stage becomes its phases (`unfreeze_steps`: see gradual_phases; finetune.model.freeze).
    `base_lr`: the rate the range test found for optimizer.lr=auto (until then each stage's lr is nan)."""
    if base_lr is not None:  # found for this very batch: not scaled
        lr = float(base_lr)
    else:
        lr = float("nan") if str(cfg.optimizer.lr) == "auto" else scaled_lr(cfg)
    base_policy, base_n = choice(cfg.freeze.name), int(cfg.freeze.n)
    if not cfg.trainer.stages:
        stages = [Stage("train", int(cfg.trainer.epochs), base_policy, base_n, lr)]
    else:
        stages = [Stage(name=s.name, epochs=int(s.epochs),
                        policy=choice(s.freeze) if s.freeze is not None else base_policy,
                        n=int(s.n) if s.n is not None else base_n,
                        lr=lr * float(s.lr_scale), lr_scale=float(s.lr_scale))
                  for s in cfg.trainer.stages]
    every, cap = int(cfg.freeze.get("every", 1)), cfg.freeze.get("max_blocks")
    steps = list(unfreeze_steps if unfreeze_steps is not None else range(1, 1000))[:cap]
    return [phase for stage in stages
            for phase in (gradual_phases(stage, every, steps) if stage.policy == "gradual" else [stage])]


def scaled_lr(cfg) -> float:
    """optimizer.lr, or with optimizer.lr_scaling=linear: lr * trainer.batch_size / optimizer.lr_reference_batch
    (the linear scaling rule, Goyal et al. 2017: a batch k times larger takes k times the rate)."""
    lr = float(cfg.optimizer.lr)
    if choice(cfg.optimizer.get("lr_scaling", "none")) != "linear":
        return lr
    return lr * int(cfg.trainer.batch_size) / int(cfg.optimizer.get("lr_reference_batch", 32))


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
              steps_per_epoch: int | None, verbose: int, class_weight: dict | None = None,
              small_graph: bool = False):
    """Fit one stage; epochs are numbered continuously across stages. Returns the History. `small_graph`:
    a head alone on cached features (see without_graph_optimizer)."""
    from finetune.train.distribute import shard_by_data

    train_ds, val_ds = shard_by_data(train_ds), shard_by_data(val_ds)
    build_optimizer(model)
    with expected_end_of_data(), without_graph_optimizer(small_graph):
        return model.fit(train_ds, validation_data=val_ds, initial_epoch=first_epoch,
                         epochs=first_epoch + epochs, callbacks=callbacks, class_weight=class_weight,
                         steps_per_epoch=steps_per_epoch, verbose=verbose,
                         shuffle=False)  # the pipeline shuffles; this only silences Keras


def build_optimizer(model) -> None:
    """Create the optimizer's slots (Adam's moments, ...) for the model's trainable weights now, eagerly.
    Keras creates them at the first update, inside the traced train step, where each variable is lifted
    out of the graph: ~0.15 s of a small head's ~0.6 s trace here, paid by every trial of a sweep (eagerly:
    ~0.015 s). The same weights as Keras would use (those trainable when fit starts). Under a distribution
    strategy Keras keeps doing it, inside the strategy's replica context."""
    import tensorflow as tf

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or getattr(optimizer, "built", True) or tf.distribute.has_strategy():
        return
    import keras

    with keras.name_scope(optimizer.name, caller=optimizer):  # as Keras names them
        optimizer.build(list(model.trainable_variables))


@contextlib.contextmanager
def without_graph_optimizer(active: bool = True):
    """TensorFlow's graph optimizer (Grappler) off while `active`: its passes run when each traced
    function first runs, and over a head's train and test steps (a few small matmuls, no convolution
    to fuse) they cost more than they save: ~0.09 s of a sweep trial's ~0.68 s fit here. Back as it
    was afterwards (a backbone's steps keep it)."""
    if not active:
        yield
        return
    import tensorflow as tf

    before = dict(tf.config.optimizer.get_experimental_options())
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer":
                                                      before.get("disable_meta_optimizer", False)})
