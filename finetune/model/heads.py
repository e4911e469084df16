"""Head designs: what sits on the backbone's features and ends in the classifier."""
from __future__ import annotations

import keras

from finetune.config.schema import choice


def build_head(cfg_head, num_classes: int) -> list:
    """Layers of the head, in order; the last is the softmax classifier over `num_classes`."""
    kind = choice(cfg_head.name)
    layers: list = []
    if kind == "flatten_mlp":
        layers.append(keras.layers.Flatten(name="head_flatten"))
    elif kind == "linear":
        if cfg_head.dropout > 0:
            layers.append(keras.layers.Dropout(cfg_head.dropout, name="head_dropout"))
        layers.append(_classifier(num_classes))
        return layers
    for i, units in enumerate(cfg_head.units):
        layers.append(keras.layers.Dense(units, activation=cfg_head.activation, name=f"head_dense_{i}"))
        if cfg_head.dropout > 0:
            layers.append(keras.layers.Dropout(cfg_head.dropout, name=f"head_dropout_{i}"))
    layers.append(_classifier(num_classes))
    return layers


def _classifier(num_classes: int):
    # float32 whatever the precision policy: a softmax in bfloat16/float16 loses the small probabilities
    return keras.layers.Dense(num_classes, activation="softmax", name="classifier", dtype="float32")
