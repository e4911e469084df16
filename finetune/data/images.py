"""Turning `images=` (files, folders, globs) into a sorted list of image files."""
from __future__ import annotations

import glob
from pathlib import Path

from finetune.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def list_images(spec, key: str = "images") -> list[str]:
    """Files named by `spec`: a path, a folder (searched recursively), a glob, or a list of those."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    if not items:
        raise ConfigError(key, spec, "image files, folders or globs, e.g. images=[a.jpg,b.png] or images=photos/")
    found: list[str] = []
    for item in items:
        found.extend(_expand(str(item), key))
    return list(dict.fromkeys(found))  # keep order, drop repeats


def _expand(item: str, key: str) -> list[str]:
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(key, item, f"a folder holding images ({' '.join(IMAGE_SUFFIXES)})")
        return files
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(key, item, f"an image file ({' '.join(IMAGE_SUFFIXES)})")
        return [str(path)]
    matches = sorted(p for p in glob.glob(str(path), recursive=True)
                     if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        raise ConfigError(key, item, "an existing image file, folder or glob that matches images")
    return matches
