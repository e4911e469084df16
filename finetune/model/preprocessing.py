"""The backbone's own input preprocessing as a Keras layer, saved inside every model.

Keeping it in the model (instead of only in the tf.data pipeline) means training, evaluation and
serving feed the same raw 0..255 RGB images and cannot diverge. The four modes are the ones
`keras.applications.*.preprocess_input` implement (checked against them in the tests).
"""
from __future__ import annotations

import keras
from keras import ops

MODES = ("caffe", "tf", "torch", "none")
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="finetune")
class BackbonePreprocess(keras.layers.Layer):
    """Maps RGB images in [0, 255] to what the backbone was trained on."""

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
