"""augmentation_preview.png: the first 16 training images of a run as its model sees them.

The picture depends only on the training split's files, the augmentation policy, the seed, the
sampler and the input size. Drawing it (a pipeline pass and a 16-image plot) takes ~0.5-0.9 s here,
longer than a head trains on cached features. So a drawn preview is kept in the cache folder
($FINETUNE_CACHE_DIR/previews, else ~/.cache/finetune/previews) under a hash of what decides it,
and the next run or sweep trial with the same inputs links (or copies) it. The folder keeps the
`KEPT` most recently used previews (~100-250 KB each). A cache folder that cannot be written only
means the preview is drawn each time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune.config.paths import cache_dir
from finetune.config.schema import choice

PREVIEW_IMAGES = 16
PREVIEW_VERSION = 1  # bump when the picture changes for the same inputs
KEPT = 200


def record_augmentation_preview(run) -> None:
    """Writes `run.out`/augmentation_preview.png (from the cache when it holds it) and logs it."""
    from finetune import files, tracking

    path = run.out / "augmentation_preview.png"
    cached = cache_dir("previews", preview_key(run) + ".png")
    if cached.is_file():
        files.link_or_copy(cached, path)
        _touch(cached)
    else:
        draw_preview(run, path)
        _keep(path, cached)
    tracking.log_artifact(str(path))


def draw_preview(run, path: Path) -> None:
    from finetune.train import reports

    policy = run.cfg.augment
    images, titles = preview_images(run)
    reports.plot_image_grid(images, titles, path,
                            f"training images as the model sees them: augment={choice(policy.name)}"
                            + (f", mixup={policy.mixup:g}" if policy.mixup else "")
                            + (f", cutmix={policy.cutmix:g}" if policy.cutmix else ""))


def preview_key(run) -> str:
    """A hash of everything the preview depends on."""
    import tensorflow as tf
    from omegaconf import OmegaConf

    from finetune.features.cache import PIPELINE_VERSION, split_fingerprint

    cfg = run.cfg
    text = json.dumps([PREVIEW_VERSION, PIPELINE_VERSION, tf.__version__, split_fingerprint(run.dataset, "train"),
                       OmegaConf.to_container(cfg.augment, resolve=True, enum_to_str=True), int(cfg.data.seed),
                       str(cfg.data.get("sampler", "none")), list(run.parts.input_shape)],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _keep(path: Path, cached: Path) -> None:
    """A copy of the drawn preview in the cache folder, the oldest beyond KEPT removed."""
    from finetune import files

    try:
        files.link_or_copy(path, cached)
        kept = sorted(cached.parent.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEPT:]:
            old.unlink(missing_ok=True)
    except OSError:  # a read-only or full cache folder: the run keeps its own preview
        pass


def _touch(cached: Path) -> None:
    try:
        os.utime(cached)
    except OSError:
        pass


def preview_images(run) -> tuple[list, list[str]]:
    """The first training batch of 16 as the model sees it, with a title per image (its class, or the two
    largest shares of a mixed label)."""
    import numpy as np

    from finetune.data import make_pipeline

    # its own pipeline (same seed, same policy): iterating the run's training pipeline here would move its
    # shuffle and augmentation draws on by an iteration, and training would no longer match a resumed run
    # or the same run on cached features
    cfg = run.cfg
    pipeline = make_pipeline(run.dataset, "train", tuple(run.parts.input_shape[:2]), PREVIEW_IMAGES, training=True,
                             seed=int(cfg.data.seed), cache="off", augment=cfg.augment,
                             sampler=choice(cfg.data.get("sampler", "none")))
    images, titles = [], []
    for x, y in pipeline.take(1):
        for image, label in zip(x.numpy(), y.numpy()):
            label = np.asarray(label)
            if label.ndim:  # one-hot, mixed: the two largest shares
                top = np.argsort(label)[::-1][:2]
                text = " + ".join(f"{run.classes[c]} {label[c]:.2f}" for c in top if label[c] > 0.005)
            else:
                text = run.classes[int(label)]
            images.append(image)
            titles.append(text)
    return images[:PREVIEW_IMAGES], titles[:PREVIEW_IMAGES]
