"""`finetune train trainer.dry_run=true`: what the run would do, in seconds, and nothing else.

It prints the data sizes per split and class, the model summary, the first stage's freeze plan and its
trainable / frozen parameter counts, whether the feature cache would hit, and an estimated time per epoch
from a timed training step on a handful of random images. It starts no MLflow run, trains nothing and saves no
model (the data itself may be prepared and cached, as any command does; Hydra still writes its run folder).
"""
from __future__ import annotations

import math
import time

import numpy as np

from finetune.config.schema import choice

TIMED_IMAGES = 4   # images per timed step (a full batch of a big backbone alone takes seconds here)
TIMED_STEPS = 1    # after one untimed step that builds the training function


def dry_run(cfg, spec, dataset) -> dict:
    """Print the plan of a train run; returns the numbers it printed."""
    start = time.perf_counter()
    print("\n== finetune train: dry run (no MLflow run; nothing trained or saved) ==")
    if dataset is None:
        print(f"  data=features: a head on the vectors in {cfg.data.path}; nothing to estimate beyond that")
        return {"dry_run": True}
    _print_data(dataset)
    from finetune.app.checks import check_freeze_built
    from finetune.model.assemble import assemble, build_parts
    from finetune.model.freeze import apply_freeze, format_plan, unfreeze_steps
    from finetune.train.cached_features import uses_feature_cache
    from finetune.train.run import keras_session
    from finetune.train.stages import plan_stages

    with keras_session(cfg, spec) as compute:
        parts = build_parts(cfg.backbone, cfg.head, spec, len(dataset.class_names))
        check_freeze_built(cfg, parts)
        stages = plan_stages(cfg, unfreeze_steps=unfreeze_steps(parts.blocks))
        stage = stages[0]
        plan = apply_freeze(parts.backbone, parts.blocks, stage.policy, stage.n, choice(cfg.freeze.batchnorm))
        backbone_trains = bool(parts.backbone.trainable_weights)
        model = assemble(parts, backbone_training=None if backbone_trains else False)
        model.summary(print_fn=lambda line, *args, **kwargs: print(line))
        print(format_plan(plan, f"freeze plan, stage 1 of {len(stages)} {stage.name!r} "
                                f"(freeze={stage.policy}{f', n={stage.n}' if stage.policy == 'last_n' else ''})"))
        trainable, frozen = _count(model.trainable_weights), _count(model.non_trainable_weights)
        print(f"  parameters: {trainable + frozen:,} total, {trainable:,} trainable, {frozen:,} frozen")
        cached = uses_feature_cache(cfg, backbone_trains, [])
        cache = _cache_state(cfg, parts, dataset, compute.keras_policy) if cached else "not used (the backbone trains)"
        print(f"  feature cache: {cache}")
        seconds = _time_step(cfg, model, len(dataset.class_names), parts.input_shape)
    steps = math.ceil(dataset.train.size / int(cfg.trainer.batch_size))
    per_epoch = seconds * dataset.train.size
    note = (" (on a cache hit the head trains on stored vectors: far less)" if cached else "")
    print(f"  estimated time per epoch: {per_epoch:.1f} s ({steps} steps of {cfg.trainer.batch_size}; "
          f"{seconds * 1000:.1f} ms per image, timed on {TIMED_IMAGES} random images){note}")
    print(f"  dry run took {time.perf_counter() - start:.1f} s")
    return {"dry_run": True, "params_total": trainable + frozen, "params_trainable": trainable,
            "params_frozen": frozen, "seconds_per_epoch": per_epoch, "feature_cache": cache}


def _print_data(dataset) -> None:
    print(f"  data: {dataset.name}, {len(dataset.class_names)} classes")
    for split in ("train", "val", "test"):
        part = getattr(dataset, split)
        if part is None:
            continue
        if part.labels is None:
            print(f"    {split:<5} {part.size:>7,} images (per class: counted when read)")
            continue
        counts = np.bincount(np.asarray(part.labels, np.int64), minlength=len(dataset.class_names))
        shown = ", ".join(f"{name} {n}" for name, n in zip(dataset.class_names[:12], counts[:12]))
        more = f", ... ({len(dataset.class_names) - 12} more)" if len(dataset.class_names) > 12 else ""
        print(f"    {split:<5} {part.size:>7,} images: {shown}{more}")


def _cache_state(cfg, parts, dataset, keras_policy: str) -> str:
    """hit / miss per split, from the cache keys the run would use (no vectors are loaded)."""
    from finetune.features.cache import FeatureCache, cache_key, split_fingerprint
    from finetune.train.cached_features import augmented_views, backbone_description

    if augmented_views(cfg):
        return f"{augmented_views(cfg)} augmented views of the training split (checked when the run starts)"
    cache = FeatureCache(max_gb=float(cfg.trainer.feature_cache_max_gb))
    backbone = backbone_description(cfg, parts, keras_policy)
    states = []
    for split in ("train", "val", "test"):
        if getattr(dataset, split) is None:
            continue
        key = cache_key({"backbone": backbone, "data": split_fingerprint(dataset, split)})
        states.append(f"{split} {'hit' if cache._files(key)[0].is_file() else 'miss'}")
    refresh = " (trainer.feature_cache=refresh: extracted again anyway)" if choice(cfg.trainer.feature_cache) == "refresh" else ""
    return ", ".join(states) + refresh


def _time_step(cfg, model, num_classes: int, input_shape) -> float:
    """Seconds per training image of the first stage, from TIMED_STEPS steps on TIMED_IMAGES random images."""
    from finetune.train.optim import compile_model

    compile_model(model, cfg.optimizer, 1e-3, num_classes, cfg_loss=cfg.loss)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (TIMED_IMAGES, *input_shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, TIMED_IMAGES)
    model.train_on_batch(images, labels)  # builds the training function
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        model.train_on_batch(images, labels)
    return (time.perf_counter() - start) / (TIMED_STEPS * TIMED_IMAGES)


def _count(weights) -> int:
    return int(sum(math.prod(w.shape) for w in weights))
