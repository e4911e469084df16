"""What a stage is compiled with: optimizer, loss and metrics, each looked up by name in a registry (the
next recipe options are new entries here, not new branches). The learning-rate schedule is a callback
(finetune.train.schedules) that sets the optimizer's rate before each batch."""
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


class OneHotLoss(keras.losses.Loss):
    """A Keras loss on one-hot targets, fed integer labels: one-hot inside. Keras' sparse cross-entropy
    has no label smoothing and there is no sparse focal loss; the labels stay integers for the data, the
    metrics and the class weights. (Only training uses it: saved models carry no compile config.)"""

    def __init__(self, inner, num_classes: int, name: str = "loss"):
        super().__init__(name=name)
        self.inner, self.num_classes = inner, int(num_classes)

    def call(self, y_true, y_pred):
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        target = keras.ops.one_hot(labels, self.num_classes, dtype=y_pred.dtype)
        return self.inner(target, y_pred)  # the inner loss reduces per example (no reduction here)


def _crossentropy(cfg_loss, num_classes, one_hot):
    smoothing = float(cfg_loss.label_smoothing)
    if one_hot:
        return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    if not smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    return OneHotLoss(keras.losses.CategoricalCrossentropy(label_smoothing=smoothing, reduction=None), num_classes)


def _focal(cfg_loss, num_classes, one_hot):
    options = dict(alpha=float(cfg_loss.alpha), gamma=float(cfg_loss.gamma),
                   label_smoothing=float(cfg_loss.label_smoothing))
    if one_hot:
        return keras.losses.CategoricalFocalCrossentropy(**options)
    return OneHotLoss(keras.losses.CategoricalFocalCrossentropy(**options, reduction=None), num_classes)


# loss.name -> (cfg, number of classes, whether the labels are one-hot already) -> Keras loss on softmax
# outputs and integer labels (one-hot ones when MixUp/CutMix mix them)
LOSSES = {"crossentropy": _crossentropy, "focal": _focal}


def common_options(cfg_opt, accumulate: int = 1) -> dict:
    """Options every Keras optimizer takes. weight_decay is Keras' decoupled decay (for adam that makes it
    AdamW; for sgd, SGDW): applied for every optimizer, never silently dropped. ema: Keras keeps a moving
    average of the weights and writes it into the model at the end of fit. accumulate: batches per update."""
    options = {}
    if getattr(cfg_opt, "ema", False):
        options.update(use_ema=True, ema_momentum=float(cfg_opt.ema_momentum))
    if int(accumulate) > 1:
        options["gradient_accumulation_steps"] = int(accumulate)
    if cfg_opt.weight_decay:
        options["weight_decay"] = float(cfg_opt.weight_decay)
    if cfg_opt.clipnorm:
        options["clipnorm"] = float(cfg_opt.clipnorm)
    return options


def make_optimizer(cfg_opt, lr: float, accumulate: int = 1):
    build = lookup(OPTIMIZERS, "optimizer", choice(cfg_opt.name))
    return build(cfg_opt, lr, common_options(cfg_opt, accumulate))


def make_loss(cfg_loss, num_classes: int, one_hot: bool = False):
    """The loss of `cfg_loss` (the `loss` group; None: plain cross-entropy) for integer labels, or one-hot
    ones (`one_hot`)."""
    if cfg_loss is None:
        return keras.losses.CategoricalCrossentropy() if one_hot else keras.losses.SparseCategoricalCrossentropy()
    return lookup(LOSSES, "loss", choice(cfg_loss.name))(cfg_loss, num_classes, one_hot)


def metric_objects(num_classes: int, one_hot: bool = False) -> list:
    """accuracy (and top5_accuracy beyond 5 classes), on integer or one-hot labels (the argmax class)."""
    if one_hot:
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        top = keras.metrics.TopKCategoricalAccuracy
    else:
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        top = keras.metrics.SparseTopKCategoricalAccuracy
    if num_classes > 5:
        metrics.append(top(k=5, name="top5_accuracy"))
    return metrics


def compile_model(model, cfg_opt, lr: float, num_classes: int, jit_compile: bool = False, cfg_loss=None,
                  one_hot: bool = False, accumulate: int = 1) -> None:
    """(Re)compile: required after any change of `trainable` for it to take effect. `one_hot`: the labels
    are one-hot (MixUp/CutMix on); `accumulate`: batches per optimizer update."""
    model.compile(optimizer=make_optimizer(cfg_opt, lr, accumulate), loss=make_loss(cfg_loss, num_classes, one_hot),
                  metrics=metric_objects(num_classes, one_hot), jit_compile=jit_compile)
