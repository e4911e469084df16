"""Class imbalance: the class weights of `trainer.class_weight` and the per-class report at a run's end.

    none       no weights
    balanced   class c weighs n / (k * n_c) (n training images, k classes, n_c of class c; scikit-learn's
               "balanced"), so every class carries the same total weight in an epoch
    {name: w}  the listed classes weigh w, the others 1

(`data.sampler=balanced`, the other remedy, lives in the data pipeline: finetune.data.pipeline.)
"""
from __future__ import annotations

import numpy as np

from finetune.errors import ConfigError

MINORITY_SHARE = 0.5  # a class is a minority class below this share of an even split (n / k)


def label_counts(labels, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, np.int64).reshape(-1), minlength=num_classes)[:num_classes]


def class_weights(value, class_names: list[str], counts: np.ndarray) -> dict[int, float] | None:
    """{class index: weight} for Keras' fit(class_weight=...), or None for none."""
    if value is None or str(value) == "none":
        return None
    k = len(class_names)
    if str(value) == "balanced":
        n = float(counts.sum())
        return {c: (n / (k * float(counts[c])) if counts[c] else 1.0) for c in range(k)}
    weights = {c: 1.0 for c in range(k)}
    for name, weight in dict(value).items():
        if str(name) not in class_names:
            raise ConfigError(f"trainer.class_weight.{name}", weight,
                              f"a class of the data: {', '.join(class_names[:20])}"
                              + (", ..." if k > 20 else ""))
        weights[class_names.index(str(name))] = float(weight)
    return weights


def minority_classes(counts: np.ndarray) -> list[int]:
    """Classes with fewer than MINORITY_SHARE x n / k training images (none in balanced data)."""
    k = len(counts)
    even = counts.sum() / max(1, k)
    return [c for c in range(k) if counts[c] < MINORITY_SHARE * even]


def minority_summary(counts: np.ndarray, class_names: list[str], per_class: dict, split: str) -> tuple[str, dict]:
    """The end-of-run line on the minority classes (their training images and recall on `split`) and the
    metric `<split>_minority_recall` (their mean recall); ("", {}) when no class is a minority."""
    minority = minority_classes(counts)
    if not minority:
        return "", {}
    recalls = [per_class[f"recall_{class_names[c]}"] for c in minority]
    parts = ", ".join(f"{class_names[c]} ({int(counts[c])} training images) recall {r:.3f}"
                      for c, r in zip(minority, recalls))
    return (f"   minority classes: {parts} on {split}",
            {f"{split}_minority_recall": float(np.mean(recalls))})
