"""A model's forward pass on one batch, traced once for every batch size.

Keras' `predict_on_batch` traces its function for the first batch's shape, then once more, relaxed,
for the first batch of another size: a split's last, partial batch. For a backbone that second trace
costs as much as the first (MobileNetV2 at 128 px: ~0.6 s here, against ~0.09 s to run a batch of
32), in every feature extraction and every evaluation. `predict_batch` traces `model(x,
training=False)` once over a batch dimension of None and keeps that function for as long as the
model lives. It compiles with XLA when Keras would (`model.jit_compile`: on a GPU, not on a CPU).
Under a distribution strategy it leaves the batch to Keras, which splits it over the replicas.
"""
from __future__ import annotations

import weakref

import numpy as np

# model -> {(shape without the batch dimension, dtype): traced function}. Weak keys: the functions
# reach the model only through a weak reference, so a trial's model is freed with its entry.
_traced: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def predict_batch(model, images) -> np.ndarray:
    """`model`'s outputs for one batch of `images` (an array or tensor), as a numpy array."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return np.asarray(model.predict_on_batch(images))
    images = tf.convert_to_tensor(images)
    return np.asarray(_function(model, images)(images))


def _function(model, images):
    import tensorflow as tf

    functions = _traced.setdefault(model, {})
    key = (tuple(images.shape[1:]), images.dtype.name)
    if key not in functions:
        held = weakref.ref(model)
        spec = tf.TensorSpec((None, *images.shape[1:]), images.dtype)
        functions[key] = tf.function(lambda x: held()(x, training=False), input_signature=[spec],
                                     jit_compile=bool(getattr(model, "jit_compile", False)), autograph=False)
    return functions[key]
