"""The backbone's own input preprocessing, built from Keras' built-in layers and ops inside every model.

Keeping it in the model (instead of only in the tf.data pipeline) means training, evaluation and
serving feed the same raw 0..255 RGB images and cannot diverge. Building it from built-in pieces only
(a `Rescaling` or `Identity` layer, plus `keras.ops.flip` for caffe's RGB -> BGR) means a saved
`model.keras` loads with plain Keras in safe mode, where finetune is not installed, and adds no
weights. The four modes are the ones `keras.applications.*.preprocess_input` implement (checked
against them in the tests):

- caffe: RGB -> BGR, then subtract the ImageNet BGR means;
- tf:    x / 127.5 - 1;
- torch: x / 255, then (x - mean) / std per channel (one per-channel scale and offset);
- none:  the image as it is (the backbone rescales itself: EfficientNet, ConvNeXt, ...).

`BackbonePreprocess` is the custom layer models saved before this change hold; it stays registered
so finetune still loads them. New models never contain it.
"""
from __future__ import annotations

import keras
from keras import ops

MODES = ("caffe", "tf", "torch", "none")
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


class Preprocessing:
    """Call it on the image tensor of a functional graph: `x = preprocessing("caffe")(inputs)`.

    One object holds one built-in layer (named `name`), so the models re-assembled around the same
    parts share it; caffe adds a `keras.ops.flip` over the channels before it (an op, not a layer)."""

    def __init__(self, mode: str, name: str = "preprocess"):
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
        self.mode = mode
        self.flip_channels = mode == "caffe"
        self.layer = _layer(mode, name)

    def __call__(self, images):
        x = ops.flip(images, axis=-1) if self.flip_channels else images
        return self.layer(x)

    def __repr__(self) -> str:
        return f"Preprocessing(mode={self.mode!r}, layer={type(self.layer).__name__}({self.layer.name!r}))"


def preprocessing(mode: str, name: str = "preprocess") -> Preprocessing:
    """The preprocessing of a `BackboneSpec.preprocess` mode, from Keras' built-in layers and ops."""
    return Preprocessing(mode, name=name)


def _layer(mode: str, name: str) -> keras.layers.Layer:
    # Rescaling(scale, offset) computes x * scale + offset with per-channel lists where needed; it holds
    # its constants in its config, not in variables, so the model's parameter count does not change.
    if mode == "caffe":  # after the flip: x - BGR mean
        return keras.layers.Rescaling(1.0, offset=[-m for m in _CAFFE_BGR_MEAN], name=name)
    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)
    if mode == "torch":  # (x / 255 - mean) / std  ==  x * (1 / (255 std)) - mean / std
        return keras.layers.Rescaling([1.0 / (255.0 * s) for s in _TORCH_STD],
                                      offset=[-m / s for m, s in zip(_TORCH_MEAN, _TORCH_STD)], name=name)
    return keras.layers.Identity(name=name)


@keras.saving.register_keras_serializable(package="finetune")
class BackbonePreprocess(keras.layers.Layer):
    """The custom layer of models saved before preprocessing was built from built-in layers: kept only
    so `finetune predict/evaluate/export` still load those models. Build new models with
    `preprocessing(mode)`."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
