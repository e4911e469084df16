"""What a stage is compiled with: optimizer, learning-rate schedule, loss and metrics, each looked up by
name in a registry (the next recipe options are new entries here, not new branches)."""
from __future__ import annotations

import keras

from finetune.config.schema import choice
from finetune.registry import lookup


def _adam(cfg_opt, lr, common):
    return keras.optimizers.Adam(learning_rate=lr, **common)


def _adamw(cfg_opt, lr, common):
    # Keras' AdamW decays by 0.004 unless told: optimizer.weight_decay (0 included) is what it uses
    return keras.optimizers.AdamW(learning_rate=lr, **{**common, "weight_decay": float(cfg_opt.weight_decay)})


def _sgd(cfg_opt, lr, common):
    return keras.optimizers.SGD(learning_rate=lr, momentum=cfg_opt.momentum, nesterov=cfg_opt.nesterov, **common)


# optimizer.name -> (cfg, learning rate or schedule, {weight_decay, clipnorm}) -> Keras optimizer
OPTIMIZERS = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}
# schedule name -> (base lr, optimizer steps of the stage) -> learning rate or a Keras schedule
SCHEDULES = {"constant": lambda lr, steps: lr}
# loss name -> () -> Keras loss on integer labels and softmax outputs
LOSSES = {"sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy}


def common_options(cfg_opt) -> dict:
    """Options every Keras optimizer takes. weight_decay is Keras' decoupled decay (for adam that makes it
    AdamW; for sgd, SGDW): applied for every optimizer, never silently dropped."""
    options = {}
    if cfg_opt.weight_decay:
        options["weight_decay"] = float(cfg_opt.weight_decay)
    if cfg_opt.clipnorm:
        options["clipnorm"] = float(cfg_opt.clipnorm)
    return options


def make_optimizer(cfg_opt, lr: float, steps: int | None = None, schedule: str = "constant"):
    learning_rate = lookup(SCHEDULES, "schedule", schedule)(lr, steps)
    build = lookup(OPTIMIZERS, "optimizer", choice(cfg_opt.name))
    return build(cfg_opt, learning_rate, common_options(cfg_opt))


def metric_objects(num_classes: int) -> list:
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


def compile_model(model, cfg_opt, lr: float, num_classes: int, jit_compile: bool = False,
                  loss: str = "sparse_categorical_crossentropy") -> None:
    """(Re)compile: required after any change of `trainable` for it to take effect."""
    model.compile(optimizer=make_optimizer(cfg_opt, lr), loss=lookup(LOSSES, "loss", loss)(),
                  metrics=metric_objects(num_classes), jit_compile=jit_compile)
