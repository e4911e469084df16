"""Datasets: sources (shapes, digits, folder, tfds) and tf.data pipelines.

Importing this package never imports tensorflow: `load_dataset` and the scanners are pure
python for shapes/digits/folder; `make_pipeline`/`load_image` load tensorflow on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Split": "dataset",
    "Dataset": "dataset",
    "data_options": "dataset",
    "load_dataset": "sources",
    "source_of": "sources",
    "SOURCES": "sources",
    "scan_folder": "folder",
    "IMAGE_EXTENSIONS": "folder",
    "stratified_split": "split",
    "network_reachable": "tfds",
    "ensure_shapes": "shapes",
    "make_pipeline": "pipeline",
    "load_image": "pipeline",
    "estimated_bytes": "pipeline",
    "POLICIES": "augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'finetune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"finetune.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
