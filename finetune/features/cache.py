"""Backbone features computed once, kept on disk, found again by what determines them.

A frozen backbone in inference mode maps an image to the same vector in every epoch, every run and
every trial of a sweep. `train` computes those vectors once per split (trainer.feature_cache) and
trains the head on them; this module is the on-disk store.

An entry's key is the SHA-256 of everything its vectors depend on: the backbone (name, include_top,
pooling, input shape, preprocessing), a hash of its actual weights (so random init, ImageNet, or a
file all key correctly), the layer, the input pipeline's version, and the split's content (file
paths with sizes and modification times, or a hash of in-memory images; the TFDS name, version and
split). Entries are `<key>.npz` (features float32, labels int32; never pickle) with `<key>.json`
describing them, written atomically (temp file + rename). The store keeps to a size limit by removing
the least recently used entries. Location: $FINETUNE_CACHE_DIR/features, else
~/.cache/finetune/features. `finetune cache` lists and clears it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.config.paths import cache_dir

# Bump when the decode/resize pipeline changes what a backbone sees.
PIPELINE_VERSION = 1
DEFAULT_MAX_GB = 10.0


def cache_root() -> Path:
    return cache_dir("features")


def weights_digest(model) -> str:
    """SHA-256 over a model's weights (names, shapes, values), in a fixed order."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        digest.update(f"{weight.path if hasattr(weight, 'path') else weight.name}:{value.shape}:{value.dtype}"
                      .encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def split_fingerprint(dataset, split: str) -> dict:
    """What identifies the content of one split of a finetune Dataset."""
    part = getattr(dataset, split)
    labels = hashlib.sha256(np.asarray(part.labels if part.labels is not None else [], np.int64).tobytes())
    out = {"dataset": dataset.name, "split": split, "size": int(part.size), "classes": list(dataset.class_names),
           "labels": labels.hexdigest()}
    if part.paths is not None:
        files = hashlib.sha256()
        for path in part.paths:
            stat = os.stat(path)
            files.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        out["files"] = files.hexdigest()
        if part.pillow is not None and any(part.pillow):  # which files Pillow decodes (EXIF rotation, ...)
            out["pillow"] = hashlib.sha256(np.packbits(np.asarray(part.pillow, bool)).tobytes()).hexdigest()
    elif part.images is not None:
        images = np.ascontiguousarray(part.images)
        out["images"] = hashlib.sha256(images.tobytes()).hexdigest() + f":{images.shape}:{images.dtype}"
    else:
        extra = dataset.extra
        out["tfds"] = {"name": extra.get("dataset"), "version": extra.get("version"),
                       "data_dir": str(extra.get("data_dir")), "split": part.tfds_split}
    return out


def cache_key(description: dict) -> str:
    text = json.dumps({"pipeline_version": PIPELINE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Entry:
    key: str
    bytes: int
    last_used: float
    description: dict


class FeatureCache:
    def __init__(self, root: Path | None = None, max_gb: float = DEFAULT_MAX_GB):
        self.root = Path(root) if root else cache_root()
        self.max_bytes = int(max_gb * 2**30)

    def _files(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, key: str) -> dict | None:
        """{"features", "labels"} of an entry, or None when absent or unreadable."""
        data_file, _ = self._files(key)
        try:
            with np.load(data_file, allow_pickle=False) as data:
                arrays = {"features": data["features"], "labels": data["labels"]}
        except (OSError, KeyError, ValueError):
            return None
        os.utime(data_file)  # least recently used goes first
        return arrays

    def store(self, key: str, features: np.ndarray, labels: np.ndarray, description: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        data_file, meta_file = self._files(key)
        tmp = data_file.with_name(f".{key}.{os.getpid()}.tmp.npz")
        np.savez(tmp, features=features.astype(np.float32), labels=labels.astype(np.int32))
        os.replace(tmp, data_file)
        meta = {**description, "shape": list(features.shape), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp_meta = meta_file.with_name(f".{key}.{os.getpid()}.tmp.json")
        tmp_meta.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp_meta, meta_file)
        self.evict(keep=key)
        return data_file

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        found = []
        for data_file in self.root.glob("*.npz"):
            if data_file.name.startswith("."):
                continue
            key = data_file.stem
            meta_file = self._files(key)[1]
            try:
                description = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
                stat = data_file.stat()
            except (OSError, ValueError):
                continue
            found.append(Entry(key, stat.st_size, stat.st_mtime, description))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def remove(self, key: str) -> None:
        for file in self._files(key):
            file.unlink(missing_ok=True)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the store is within max_bytes."""
        removed, entries = [], self.entries()
        total = sum(e.bytes for e in entries)
        for entry in reversed(entries):  # oldest first
            if total <= self.max_bytes:
                break
            if entry.key == keep:
                continue
            self.remove(entry.key)
            total -= entry.bytes
            removed.append(entry.key)
        return removed

    def clear(self) -> int:
        entries = self.entries()
        for entry in entries:
            self.remove(entry.key)
        for stale in self.root.glob(".*.tmp.*") if self.root.is_dir() else []:
            stale.unlink(missing_ok=True)
        return len(entries)
