"""Training-time augmentation (the `augment` group), by name: a registry from the policy to its steps.

Every step works on a batch of float32 images in 0..255 [B, h, w, 3] inside the tf.data pipeline, on the
CPU, with fresh random draws every epoch (seeded). Validation and test data are never augmented.

    none    nothing
    flip    left-right mirror, p = 1/2
    light   flip, random resized crop (augment.crop_scale of the area, aspect 3/4..4/3), small rotation
            and zoom (augment.rotation, augment.zoom), colour jitter (augment.color_jitter)
    strong  flip, random resized crop, RandAugment (augment.randaugment_ops at augment.randaugment_magnitude),
            random erasing (probability augment.erasing)

MixUp (augment.mixup = alpha) and CutMix (augment.cutmix = alpha) combine with any policy; with both,
each batch gets one of them (p = 1/2, as timm does). They mix labels, so the labels of every split become
one-hot whenever either is on (`mixes`); Keras' MixUp and CutMix given integer labels return nonsense.

Keras 3's preprocessing layers (float32 whatever the run's mixed-precision policy) do the work (RandomFlip, RandomRotation, RandomZoom, RandomColorJitter,
RandAugment, RandomErasing, MixUp, CutMix); Keras has no RandomResizedCrop, so that one is
`tf.image.crop_and_resize` over boxes drawn as torchvision draws them. A new policy is a new entry in
POLICIES (and a name in the schema's AugmentKind; tests/test_data.py checks they agree).
"""
from __future__ import annotations

import math

import tensorflow as tf

from finetune.config.schema import choice
from finetune.registry import lookup

VALUE_RANGE = (0, 255)


def random_resized_crop(scale, ratio=(3 / 4, 4 / 3), seed: int = 0):
    """images [B, h, w, 3] -> a crop of each (area fraction in `scale`, aspect ratio in `ratio`, log-uniform)
    resized back to h x w; boxes that do not fit are clipped to the image."""
    low, high = float(scale[0]), float(scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    generator = tf.random.Generator.from_seed(seed)

    def crop(images):
        batch = tf.shape(images)[0]
        area = generator.uniform([batch], low, high)
        aspect = tf.exp(generator.uniform([batch], *log_ratio))
        h = tf.minimum(tf.sqrt(area / aspect), 1.0)  # fractions of the image's height and width
        w = tf.minimum(tf.sqrt(area * aspect), 1.0)
        top = generator.uniform([batch]) * (1.0 - h)
        left = generator.uniform([batch]) * (1.0 - w)
        boxes = tf.stack([top, left, top + h, left + w], axis=1)
        size = tf.shape(images)[1:3]
        return tf.image.crop_and_resize(images, boxes, tf.range(batch), size)

    return crop


def _layer(layer):
    return lambda images: layer(images, training=True)


def _none(cfg, seed):
    return []


def _flip(cfg, seed):
    import keras

    return [_layer(keras.layers.RandomFlip("horizontal", seed=seed, dtype="float32"))]


def _light(cfg, seed):
    import keras

    jitter = float(cfg.color_jitter)
    steps = [*_flip(cfg, seed), random_resized_crop(cfg.crop_scale, seed=seed + 1)]
    if float(cfg.rotation):
        steps.append(_layer(keras.layers.RandomRotation(float(cfg.rotation), fill_mode="reflect", seed=seed + 2, dtype="float32")))
    if float(cfg.zoom):
        steps.append(_layer(keras.layers.RandomZoom(float(cfg.zoom), fill_mode="reflect", seed=seed + 3, dtype="float32")))
    if jitter:
        steps.append(_layer(keras.layers.RandomColorJitter(
            VALUE_RANGE, brightness_factor=jitter, contrast_factor=jitter, saturation_factor=jitter,
            hue_factor=jitter / 10, seed=seed + 4, dtype="float32")))
    return steps


def _strong(cfg, seed):
    import keras

    steps = [*_flip(cfg, seed), random_resized_crop(cfg.crop_scale, seed=seed + 1),
             _layer(keras.layers.RandAugment(VALUE_RANGE, num_ops=int(cfg.randaugment_ops),
                                             factor=float(cfg.randaugment_magnitude), seed=seed + 5,
                                             dtype="float32"))]
    if float(cfg.erasing):
        steps.append(_layer(keras.layers.RandomErasing(factor=float(cfg.erasing), value_range=VALUE_RANGE,
                                                       seed=seed + 6, dtype="float32")))
    return [*steps, lambda images: tf.clip_by_value(images, 0.0, 255.0)]


# augment.name -> (cfg, seed) -> steps, each images [B, h, w, 3] float32 0..255 -> the same
POLICIES = {"none": _none, "flip": _flip, "light": _light, "strong": _strong}


def mixes(cfg) -> bool:
    """Whether MixUp or CutMix is on: then labels are one-hot in every split."""
    return cfg is not None and (float(cfg.get("mixup", 0) or 0) > 0 or float(cfg.get("cutmix", 0) or 0) > 0)


def _mixing(cfg, seed):
    """(images, one-hot labels) -> mixed (images, labels), or None when neither MixUp nor CutMix is on."""
    import keras

    layers = []
    if float(cfg.mixup or 0) > 0:
        layers.append(keras.layers.MixUp(alpha=float(cfg.mixup), seed=seed + 7, dtype="float32"))
    if float(cfg.cutmix or 0) > 0:
        layers.append(keras.layers.CutMix(factor=float(cfg.cutmix), seed=seed + 8, dtype="float32"))
    if not layers:
        return None

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels}, training=True)
        return out["images"], out["labels"]

    if len(layers) == 1:
        return lambda images, labels: apply(layers[0], images, labels)
    coin = tf.random.Generator.from_seed(seed + 9)
    return lambda images, labels: tf.cond(coin.uniform([]) < 0.5, lambda: apply(layers[0], images, labels),
                                          lambda: apply(layers[1], images, labels))


def as_config(augment):
    """The `augment` group's config, from itself, a policy name (its defaults) or None (no augmentation)."""
    if augment is None or not isinstance(augment, str):
        return augment
    from omegaconf import OmegaConf

    from finetune.config.schema import AugmentConfig

    lookup(POLICIES, "augment", augment)  # an unknown name: one error listing the policies
    return OmegaConf.structured(AugmentConfig(name=augment))


def augment_batches(ds: tf.data.Dataset, cfg, seed: int, num_classes: int | None = None) -> tf.data.Dataset:
    """A batched training dataset of (float32 images 0..255, labels) augmented by the policy of `cfg` (the
    `augment` group; None: nothing); labels one-hot (`num_classes`) when MixUp or CutMix is on."""
    if cfg is None:
        return ds
    steps = lookup(POLICIES, "augment", choice(cfg.name))(cfg, int(seed))
    mix = _mixing(cfg, int(seed))
    if not steps and mix is None:
        return ds

    def run(images, labels):
        static = images.shape  # some Keras layers lose it (RandAugment), others need it (RandomErasing)
        for step in steps:
            images = step(images)
            images.set_shape(static)
        if mix is not None:
            labels = tf.one_hot(tf.cast(labels, tf.int32), int(num_classes))
            images, labels = mix(images, labels)
        return images, labels

    return ds.map(run, num_parallel_calls=tf.data.AUTOTUNE)
