"""What a run trains and evaluates on: the splits as batched tf.data pipelines of (x, label), where x is
an image (the model's input) or a backbone's feature vector (a head's input). Both kinds are consumed
by the same steps (fit, recalibrate, evaluate)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finetune.config.schema import choice
from finetune.train.distribute import whole_replica_batches, whole_replica_steps


@dataclass
class Inputs:
    train: Any  # shuffled (augmented), repeated: one iterator for a whole stage
    train_plain: Any  # the training split once, in order, unaugmented (BatchNorm re-estimation, extraction)
    val: Any
    test: Any | None
    steps_per_epoch: int

    def train_from_epoch(self, epochs: int):
        """The repeated training pipeline from epoch `epochs` of a stage on: an interrupted run sees the
        same (seeded) data order as one that was never interrupted."""
        return self.train.skip(epochs * self.steps_per_epoch) if epochs > 0 else self.train

    def evaluation_sets(self) -> dict:
        return {"val": self.val, "test": self.test}


def steps_per_epoch(cfg_trainer, train_size: int) -> int:
    return int(cfg_trainer.steps_per_epoch or max(1, math.ceil(train_size / int(cfg_trainer.batch_size))))


def image_inputs(cfg, dataset, input_shape) -> Inputs:
    """Decoded, resized (cached, augmented) images of every split of `dataset`, each pipeline built when
    first used: a run that finds its backbone's features in the cache never builds them."""
    from finetune.data import make_pipeline

    from finetune.data.augment import mixes

    d, t = cfg.data, cfg.trainer
    augment = cfg.get("augment")
    common = dict(image_size=tuple(input_shape[:2]), batch_size=int(t.batch_size), seed=int(d.seed),
                  cache=choice(d.cache), cache_max_mb=int(d.cache_max_mb))
    plain = dict(common, one_hot=mixes(augment))
    has_test = dataset.test is not None and dataset.test.size
    steps = steps_per_epoch(t, dataset.train.size)

    def train():
        # one iterator for the whole stage (repeat + steps_per_epoch): a new iterator every epoch
        # stalls each epoch's end until tf.data's autotuner wakes up (measured: up to 2x on short epochs)
        pipeline = make_pipeline(dataset, "train", training=True, augment=augment,
                                 sampler=choice(d.get("sampler", "none")), **common)
        return whole_replica_batches(pipeline, dataset.train.size, int(t.batch_size), steps)[0].repeat()

    return LazyInputs({
        "train": train,
        "train_plain": lambda: make_pipeline(dataset, "train", training=False, **plain),
        "val": lambda: make_pipeline(dataset, "val", training=False, **plain),
        "test": lambda: make_pipeline(dataset, "test", training=False, **plain) if has_test else None,
    }, whole_replica_steps(dataset.train.size, int(t.batch_size), steps)[0])


class LazyInputs(Inputs):
    """Inputs whose pipelines are built on first use, by the given functions."""

    def __init__(self, factories: dict, steps_per_epoch: int):  # the dataclass fields: built on first use
        self._factories = factories
        self.steps_per_epoch = steps_per_epoch

    def __getattr__(self, name: str):
        factories = self.__dict__.get("_factories", {})
        if name not in factories:
            raise AttributeError(name)
        value = factories[name]()
        setattr(self, name, value)
        return value


def feature_inputs(sets: dict, batch_size: int, seed: int, steps: int, sampler: str = "none",
                   views: int = 0) -> Inputs:
    """Pipelines over in-memory (features, labels) arrays per split ("train", "val", optional "test");
    `sampler`: as data.sampler (balanced: every class equally likely in each training batch); `views` > 0:
    the training features are [views, N, ...] (augmented views) and each element draws one view, afresh
    every epoch."""
    import numpy as np
    import tensorflow as tf

    def batches(split):
        if split not in sets:
            return None
        return tf.data.Dataset.from_tensor_slices(sets[split]).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    features, labels = sets["train"]
    if views:
        plain = (features[0], labels)
        features = np.moveaxis(features, 0, 1)  # [N, views, ...]: an element carries all its views
    else:
        plain = (features, labels)
    if sampler == "balanced":
        labels_np = np.asarray(labels)
        streams = [tf.data.Dataset.from_tensor_slices((features[labels_np == c], labels_np[labels_np == c]))
                   .shuffle(int((labels_np == c).sum()), seed=seed + int(c), reshuffle_each_iteration=True).repeat()
                   for c in np.unique(labels_np)]
        train = tf.data.Dataset.sample_from_datasets(streams, seed=seed, rerandomize_each_iteration=True)
    else:
        train = (tf.data.Dataset.from_tensor_slices((features, labels))
                 .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True))
    if views:
        draws = tf.data.Dataset.random(seed=seed + 7, rerandomize_each_iteration=True)
        train = tf.data.Dataset.zip((train, draws)).map(lambda xy, r: (tf.gather(xy[0], r % views), xy[1]),
                                                        num_parallel_calls=tf.data.AUTOTUNE)
    # batch, then repeat: an epoch's last batch ends with the epoch, exactly as on images (the image
    # pipeline batches before it repeats), so training on cached features is training on images
    train = train.batch(batch_size)
    if sampler != "balanced":  # (balanced: an endless stream of full batches)
        train, steps = whole_replica_batches(train, len(labels), batch_size, steps)
    train = (train if sampler == "balanced" else train.repeat()).prefetch(tf.data.AUTOTUNE)
    sets = {**sets, "train": plain}
    return Inputs(train=train, train_plain=batches("train"), val=batches("val"), test=batches("test"),
                  steps_per_epoch=steps)
