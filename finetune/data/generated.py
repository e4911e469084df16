"""Datasets that need no files of the user's: `shapes` (generated once, then read like a folder) and
`digits` (scikit-learn's bundled 8x8 handwritten digits).

Pure python: never imports tensorflow.
"""
from __future__ import annotations

import numpy as np

from finetune.data.dataset import Dataset, Split
from finetune.data.folder import flatten_classes, scan_folder
from finetune.data.split import split_files, stratified_split
from finetune.errors import DataError


def load_shapes(opts) -> Dataset:
    from finetune.data import shapes

    classes = shapes.validate_classes(opts.classes)
    folder = shapes.ensure_shapes(classes, num_per_class=opts.num_per_class, image_size=opts.image_size,
                                  seed=opts.seed, cache_dir=opts.cache_dir,
                                  textured=bool(getattr(opts, "textured", False)))
    found = scan_folder(folder, key="data.cache_dir")
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"data.cache_dir: the shapes folder '{folder}' lacks classes {missing}; "
                        "delete that folder to regenerate it")
    paths, labels = flatten_classes(found, classes)
    return split_files("shapes", classes, paths, labels, opts)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (uint8 N,8,8 in 0..255, int32 labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int32)


def load_digits_dataset(opts) -> Dataset:
    images, labels = load_digits_arrays()
    tr, va, te = stratified_split(labels, 10, opts.val_split, opts.test_split, opts.seed)

    def part(idx):
        return Split(images=images[idx], labels=labels[idx], size=len(idx))

    if len(va) == 0:
        raise DataError("data.val_split: the validation split of 'digits' is empty; set data.val_split > 0")
    return Dataset(name="digits", class_names=[str(i) for i in range(10)], train=part(tr), val=part(va),
                   test=part(te) if len(te) else None, source_cfg=opts)
