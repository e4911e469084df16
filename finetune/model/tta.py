"""Test-time augmentation (`evaluate.tta`, `predict.tta`): a model's class probabilities averaged over
views of each image.

    none        the image
    flip        the image and its left-right mirror (2 views)
    flip_crops  the image, its mirror, and its 4 corner crops of CROP of each side resized back (6 views)

Views are made from the batch the model would see (float 0..255, [B, h, w, 3]): the model's own
preprocessing runs on each, so any saved model works unchanged.
"""
from __future__ import annotations

import numpy as np

from finetune.registry import lookup
from finetune.model.predict_fn import predict_batch

CROP = 0.875  # a corner crop keeps 87.5% of each side (224 of 256, as ImageNet evaluation crops)


def _none(images):
    return [images]


def _flip(images):
    import tensorflow as tf

    return [images, tf.reverse(images, axis=[2])]


def _flip_crops(images):
    import tensorflow as tf

    batch, size = tf.shape(images)[0], tf.shape(images)[1:3]
    margin = 1.0 - CROP
    views = _flip(images)
    for top, left in ((0.0, 0.0), (0.0, margin), (margin, 0.0), (margin, margin)):
        box = tf.constant([[top, left, top + CROP, left + CROP]], tf.float32)
        views.append(tf.image.crop_and_resize(images, tf.tile(box, [batch, 1]), tf.range(batch), size))
    return views


# tta name -> images [B, h, w, 3] -> the views, each like the images
VIEWS = {"none": _none, "flip": _flip, "flip_crops": _flip_crops}


def predict(model, images, mode: str = "none", key: str = "tta") -> np.ndarray:
    """Class probabilities of a batch, averaged over the views of `mode` (float64 [B, classes])."""
    views = lookup(VIEWS, key, mode)(images)
    return np.mean([predict_batch(model, view).astype(np.float64) for view in views], axis=0)
