"""A frozen backbone's features of every split, from the feature cache or extracted once and stored, so
that a stage whose backbone does not change trains its head on vectors instead of images."""
from __future__ import annotations

import time

import keras
import numpy as np

from finetune import tracking
from finetune.config.schema import choice
from finetune.data.augment import mixes


def uses_feature_cache(cfg, backbone_trains: bool, bn_layers) -> bool:
    """Only where training on cached features is exactly training on images: nothing in the backbone
    trains, it runs in inference mode, and no augmentation changes the inputs between epochs."""
    return (choice(cfg.trainer.feature_cache) != "off" and not backbone_trains and not bn_layers
            and choice(cfg.augment.name) == "none" and not mixes(cfg.augment))


def backbone_description(cfg, parts, keras_policy: str) -> dict:
    """Everything that decides the vectors a backbone gives: part of every cache key."""
    from finetune.features.cache import weights_digest

    return {"name": parts.spec.name, "include_top": bool(cfg.backbone.include_top),
            "pooling": choice(cfg.backbone.pooling), "input_shape": list(parts.input_shape),
            "preprocess": parts.spec.preprocess, "weights": weights_digest(parts.backbone),
            "layer": None, "keras": keras.__version__, "precision": keras_policy}


def cached_features(cfg, parts, dataset, images, keras_policy: str) -> dict:
    """{split: (features, labels)} for train, val and (if any) test, from the cache or extracted (then
    stored); what happened per split is logged as tags."""
    from finetune.features.cache import FeatureCache, cache_key, split_fingerprint

    cache = FeatureCache(max_gb=float(cfg.trainer.feature_cache_max_gb))
    refresh = choice(cfg.trainer.feature_cache) == "refresh"
    backbone = backbone_description(cfg, parts, keras_policy)
    extractor, sets, status = None, {}, {}
    for split, ds in {"train": images.train_plain, "val": images.val, "test": images.test}.items():
        if ds is None:
            continue
        description = {"backbone": backbone, "data": split_fingerprint(dataset, split)}
        key = cache_key(description)
        found = None if refresh else cache.load(key)
        if found is None:
            extractor = extractor or feature_extractor(parts)
            start = time.perf_counter()
            found = extract(extractor, ds)
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
    return sets


def feature_extractor(parts):
    from finetune.features.extract import feature_model

    # the backbone's own output shape: the head was built for it (a Flatten head flattens itself)
    return feature_model(parts.backbone, parts.preprocess, parts.input_shape, None, flatten=False)


def extract(extractor, ds) -> dict:
    features, labels = [], []
    for images, batch_labels in ds:
        features.append(np.asarray(extractor.predict_on_batch(images), np.float32))
        labels.append(batch_labels.numpy())
    return {"features": np.concatenate(features), "labels": np.concatenate(labels).astype(np.int32)}


def head_on_features(head_layers, feature_shape, name: str = "head_on_features"):
    """A model of the head alone over backbone features. The same layer objects as in the image model:
    training one trains the other."""
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return keras.Model(inputs, x, name=name)
