"""A frozen backbone's features of every split, from the feature cache or extracted once and stored, so
that a stage whose backbone does not change trains its head on vectors instead of images."""
from __future__ import annotations

import time

import keras
import numpy as np

from finetune import tracking
from finetune.config.schema import choice
from finetune.data.augment import mixes


def augmented_views(cfg) -> int:
    """trainer.feature_cache_views when an augmentation is on (K augmented views of each training image
    are cached, one drawn per epoch), else 0."""
    return int(cfg.trainer.get("feature_cache_views", 0)) if choice(cfg.augment.name) != "none" else 0


def uses_feature_cache(cfg, backbone_trains: bool, bn_layers) -> bool:
    """Where training on cached features is training on images: nothing in the backbone trains, it runs in
    inference mode, and either no augmentation changes the inputs between epochs, or the user chose K
    cached augmented views (trainer.feature_cache_views) over a fresh augmentation every epoch. MixUp and
    CutMix are never cached: mixing features is not mixing images (the config check refuses it)."""
    return (choice(cfg.trainer.feature_cache) != "off" and not backbone_trains and not bn_layers
            and not mixes(cfg.augment) and (choice(cfg.augment.name) == "none" or augmented_views(cfg) > 0))


def backbone_description(cfg, parts, keras_policy: str) -> dict:
    """Everything that decides the vectors a backbone gives: part of every cache key."""
    from finetune.features.cache import weights_digest
    from finetune.model import backbone_pool

    return {"name": parts.spec.name, "include_top": bool(cfg.backbone.include_top),
            "pooling": choice(cfg.backbone.pooling), "input_shape": list(parts.input_shape),
            "preprocess": parts.spec.preprocess, "weights": backbone_pool.digest(parts.backbone, weights_digest),
            "layer": None, "keras": keras.__version__, "precision": keras_policy,
            **({"preset": parts.spec.preset} if parts.spec.preset else {})}


def cached_features(cfg, parts, dataset, images, keras_policy: str) -> dict:
    """{split: (features, labels)} for train, val and (if any) test, from the cache or extracted (then
    stored); what happened per split is logged as tags."""
    from finetune.features.cache import FeatureCache, cache_key, split_fingerprint

    cache = FeatureCache(max_gb=float(cfg.trainer.feature_cache_max_gb))
    refresh = choice(cfg.trainer.feature_cache) == "refresh"
    backbone = backbone_description(cfg, parts, keras_policy)
    extractor, sets, status = None, {}, {}
    # the image pipelines by name: built (finetune.train.inputs.LazyInputs) only for a split that misses
    splits = {"train": "train_plain", "val": "val"}
    if dataset.test is not None and dataset.test.size:
        splits["test"] = "test"
    views = augmented_views(cfg)
    if views:  # K augmented views of the training split instead of the plain one
        from omegaconf import OmegaConf

        from finetune.data import make_pipeline

        policy = OmegaConf.to_container(cfg.augment, resolve=True, enum_to_str=True)
        del splits["train"]
        splits.update({f"train_view{v}": (make_pipeline(
            dataset, "train", tuple(parts.input_shape[:2]), int(cfg.trainer.batch_size), training=True, shuffle=False,
            seed=int(cfg.data.seed) + v, cache="off", augment=cfg.augment), {"augment": policy, "view": v,
                                                                           "seed": int(cfg.data.seed) + v})
                       for v in range(views)})
    for split, ds in splits.items():
        ds, extra = ds if isinstance(ds, tuple) else (ds, {})
        description = {"backbone": backbone, "data": split_fingerprint(dataset, split.split("_view")[0]), **extra}
        key = cache_key(description)
        found = None if refresh else cache.load(key)
        if found is None:
            extractor = extractor or feature_extractor(parts)
            start = time.perf_counter()
            found = extract(extractor, getattr(images, ds) if isinstance(ds, str) else ds,
                            getattr(dataset, split.split("_view")[0]).size, f"extracting {split} features")
            seconds = time.perf_counter() - start
            cache.store(key, found["features"], found["labels"], description)
            print(f"   feature cache miss ({split}): extracted {len(found['labels'])} images in {seconds:.1f} s "
                  f"({len(found['labels']) / max(seconds, 1e-9):.0f} images/s); key {key}")
            status[split] = "refresh" if refresh else "miss"
        else:
            print(f"   feature cache hit ({split}): {len(found['labels'])} images; key {key}")
            status[split] = "hit"
        sets[split] = (found["features"], found["labels"])
        tracking.log_params({f"feature_cache.{split}.key": key})
        tracking.set_tag(f"feature_cache.{split}", status[split])
    tracking.set_tag("feature_cache", ",".join(sorted(set(status.values()))))
    tracking.set_tag("feature_cache_dir", str(cache.root))
    if views:  # [K, N, ...] features; the views follow the split's order, so their labels agree
        stacked = [sets.pop(f"train_view{v}") for v in range(views)]
        sets["train"] = (np.stack([features for features, _ in stacked]), stacked[0][1])
    return sets


def feature_extractor(parts):
    from finetune.features.extract import feature_model

    # the backbone's own output shape: the head was built for it (a Flatten head flattens itself)
    return feature_model(parts.backbone, parts.preprocess, parts.input_shape, None, flatten=False)


def extract(extractor, ds, total: int = 0, desc: str = "extracting features") -> dict:
    """{"features", "labels"} of a pipeline, with a progress bar over its `total` images."""
    from finetune.progress_bar import progress_bar
    from finetune.train.evaluate import outputs_and_labels

    with progress_bar(total, desc, "images") as bar:
        features, labels = outputs_and_labels(extractor, ds, bar)
    return {"features": features.astype(np.float32, copy=False), "labels": labels.astype(np.int32)}


def head_on_features(head_layers, feature_shape, name: str = "head_on_features"):
    """A model of the head alone over backbone features. The same layer objects as in the image model:
    training one trains the other."""
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return keras.Model(inputs, x, name=name)
