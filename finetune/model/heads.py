"""Head designs: what sits on the backbone's features and ends in the classifier, by name (`head=`)."""
from __future__ import annotations

import keras

from finetune.config.schema import choice
from finetune.registry import lookup


def _dropout(cfg_head, name: str) -> list:
    return [keras.layers.Dropout(cfg_head.dropout, name=name)] if cfg_head.dropout > 0 else []


def _dense_stack(cfg_head) -> list:
    layers: list = []
    for i, units in enumerate(cfg_head.units):
        layers.append(keras.layers.Dense(units, activation=cfg_head.activation, name=f"head_dense_{i}"))
        layers += _dropout(cfg_head, f"head_dropout_{i}")
    return layers


def _linear(cfg_head) -> list:
    return _dropout(cfg_head, "head_dropout")


def _mlp(cfg_head) -> list:
    return _dense_stack(cfg_head)


def _flatten_mlp(cfg_head) -> list:
    return [keras.layers.Flatten(name="head_flatten"), *_dense_stack(cfg_head)]


# head.name -> the layers between the backbone's features and the classifier
HEADS = {"linear": _linear, "mlp": _mlp, "flatten_mlp": _flatten_mlp}


def build_head(cfg_head, num_classes: int) -> list:
    """Layers of the head, in order; the last is the softmax classifier over `num_classes`."""
    return [*lookup(HEADS, "head", choice(cfg_head.name))(cfg_head), _classifier(num_classes)]


def _classifier(num_classes: int):
    # float32 whatever the precision policy: a softmax in bfloat16/float16 loses the small probabilities
    return keras.layers.Dense(num_classes, activation="softmax", name="classifier", dtype="float32")
