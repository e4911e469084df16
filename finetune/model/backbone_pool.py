"""Frozen backbones kept built for the next run in this process (the head-only trials of a sweep).

Building a backbone costs seconds (MobileNetV2: ~1.5 s on 2 cores, more than its head trains on cached
features), and hashing its weights for the feature-cache key, or saving them, costs more the bigger it
is. A run that only trains a head (finetune.train.head_only) never changes its backbone, so the next
such run of the same backbone config, seed and precision gets the same object, its weights digest and
its saved weights file. Only the last backbone is kept: memory stays that of one backbone."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from finetune import files


@dataclass
class Pooled:
    key: str
    backbone: object
    shape: tuple
    digest: str | None = None
    weights_file: Path | None = None


_last: Pooled | None = None


def key_of(cfg_backbone, seed: int, policy: str) -> str:
    """What decides the backbone a run builds: its config, the seed (random weights), the dtype policy."""
    return json.dumps([OmegaConf.to_container(cfg_backbone, resolve=True, enum_to_str=True), seed, policy],
                      sort_keys=True, default=str)


def get_or_build(key: str, build) -> tuple:
    """(backbone, input shape): the kept one for `key`, else `build()`'s, kept in its place."""
    global _last
    if _last is None or _last.key != key:
        replaced = _last is not None
        if replaced:
            gc.unfreeze()  # the old one can be collected now
        _last = None  # the old one goes before the new one is built
        backbone, shape = build()
        _last = Pooled(key, backbone, tuple(shape))
        # what lives on from here (TensorFlow's modules, this backbone: ~400k objects) is left out of the
        # collection that each later run's clear_session does: 0.25 s a run on 2 cores, more than the rest
        # of keras_session. A full collection first only where an old backbone became garbage: in a fresh
        # process it finds ~150 objects (import leftovers, frozen with the rest) and takes ~0.23 s here
        if replaced:
            gc.collect()
        gc.freeze()
    return _last.backbone, _last.shape


def _entry(backbone) -> Pooled | None:
    return _last if _last is not None and _last.backbone is backbone else None


def digest(backbone, compute) -> str:
    """compute(backbone), once per kept backbone."""
    entry = _entry(backbone)
    if entry is None:
        return compute(backbone)
    if entry.digest is None:
        entry.digest = compute(backbone)
    return entry.digest


def save_weights(backbone, path: Path, save) -> None:
    """save(backbone, path); a kept backbone's file is written once and linked (or copied) after that."""
    entry = _entry(backbone)
    if entry is not None and entry.weights_file is not None and entry.weights_file.is_file():
        files.link_or_copy(entry.weights_file, path)
        return
    save(backbone, path)
    if entry is not None:
        entry.weights_file = Path(path)


def kept_with_weights(path: Path):
    """The kept backbone whose saved weights file `path` is (a hard link to it: the same bytes, from this very
    backbone, which a head-only run never changes), else None."""
    import os

    entry = _last
    if entry is None or entry.weights_file is None:
        return None
    try:
        return entry.backbone if os.path.samefile(entry.weights_file, path) else None
    except OSError:
        return None
