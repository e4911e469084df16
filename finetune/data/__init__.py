"""Datasets: sources (shapes, digits, folder, tfds) and tf.data pipelines.

Importing this package never imports tensorflow: `load_dataset` and the scanners are pure
python for shapes/digits/folder; `make_pipeline`/`load_image` load tensorflow on first use.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Split": "sources",
    "Dataset": "sources",
    "load_dataset": "sources",
    "scan_folder": "sources",
    "source_of": "sources",
    "stratified_split": "sources",
    "network_reachable": "sources",
    "SOURCES": "sources",
    "IMAGE_EXTENSIONS": "sources",
    "ensure_shapes": "shapes",
    "make_pipeline": "pipeline",
    "load_image": "pipeline",
    "estimated_bytes": "pipeline",
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
