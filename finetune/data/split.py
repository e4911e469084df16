"""Splitting one list of labelled items into train/val/test, per class and deterministically.

The fractions were checked before (finetune.app.checks.check_split, the one split rule); what is
checked here needs the data in hand: a validation split that came out empty.
"""
from __future__ import annotations

import math

import numpy as np

from finetune.data.dataset import Dataset, Split
from finetune.errors import DataError


def stratified_split(labels, num_classes: int, val: float, test: float, seed: int):
    """Per-class deterministic split into (train, val, test) index arrays.

    Each class keeps >= 1 training sample; with val > 0 each class with >= 2 samples gets >= 1
    validation sample. The training indices are shuffled (so class order does not leak into a
    small shuffle buffer); val and test keep class order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919])
    parts = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            for part, chosen in zip(("train", "val", "test"), _split_class(idx[rng.permutation(len(idx))], val, test)):
                parts[part].append(chosen)
    out = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
    out["train"] = out["train"][rng.permutation(len(out["train"]))]
    return out["train"], out["val"], out["test"]


def _split_class(idx: np.ndarray, val: float, test: float):
    """(train, val, test) of one class's shuffled indices."""
    n = len(idx)
    n_val = int(math.floor(n * val + 0.5))
    n_test = int(math.floor(n * test + 0.5))
    if val > 0 and n >= 2:
        n_val = max(n_val, 1)
    while n_val + n_test > n - 1:  # keep >= 1 training sample
        if n_test > 0 and (n_test >= n_val or n_val <= 1):
            n_test -= 1
        else:
            n_val -= 1
    return idx[n_test + n_val:], np.sort(idx[n_test:n_test + n_val]), np.sort(idx[:n_test])


def _file_split(paths: list[str], labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(paths=[paths[i] for i in idx], labels=labels[idx].astype(np.int32), size=len(idx))


def split_files(name, class_names, paths, labels, opts, *, val_split=None, test_split=None) -> Dataset:
    """Dataset from one list of files, splitting off val/test (data.val_split/test_split of `opts`)
    unless given separately."""
    labels = np.asarray(labels, np.int32)
    tr, va, te = stratified_split(labels, len(class_names), 0.0 if val_split else opts.val_split,
                                  0.0 if test_split else opts.test_split, opts.seed)
    train = _file_split(paths, labels, tr)
    val = val_split or _file_split(paths, labels, va)
    test = test_split or (_file_split(paths, labels, te) if len(te) else None)
    if val.size == 0:
        raise DataError(f"data.val_split: the validation split of '{name}' is empty "
                        f"(val_split={opts.val_split}); set data.val_split > 0 (e.g. 0.2) or give data.val_path")
    return Dataset(name=name, class_names=list(class_names), train=train, val=val, test=test, source_cfg=opts)
