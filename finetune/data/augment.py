"""Training-time augmentation, by name (`data.augment`): a registry from the name to a builder.

A builder takes the training dataset of (uint8 image [h, w, 3], int32 label) elements after the shuffle
and the seed, and returns the augmented dataset; it runs every epoch with fresh random draws
(reproducible from the seed). Validation and test data are never augmented. A new augmentation is a new
entry here (and a new name in the schema's `Augment` choices; tests/test_data.py checks they agree).
"""
from __future__ import annotations

import tensorflow as tf

from finetune.registry import lookup


def _none(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    return ds


def _flip(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """Each image mirrored left-right with probability 1/2."""
    coins = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip((ds, coins)).map(
        lambda xy, r: (tf.cond(r % 2 == 0, lambda: tf.reverse(xy[0], axis=[1]), lambda: xy[0]), xy[1]),
        num_parallel_calls=tf.data.AUTOTUNE)


# data.augment -> (training dataset, seed) -> augmented dataset
AUGMENTATIONS = {"none": _none, "flip": _flip}


def augment(ds: tf.data.Dataset, name: str, seed: int) -> tf.data.Dataset:
    """`ds` augmented by the augmentation called `name`; an unknown name is one error listing the options."""
    return lookup(AUGMENTATIONS, "data.augment", name)(ds, int(seed))
