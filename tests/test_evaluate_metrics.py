"""`finetune evaluate`'s metrics on probabilities whose answers are known (the CLI run in
test_trained_model_commands checks they agree with predict's probabilities on a real model)."""
from __future__ import annotations

import numpy as np
import pytest

from finetune.commands.evaluate import compute_metrics

CLASSES = ["a", "b", "c", "d"]
# rows: the true class ranks 1st, 2nd, 3rd, 4th, and 2nd tied with the 1st (ties count in its favour)
PROBS = np.array([[0.70, 0.10, 0.10, 0.10],
                  [0.50, 0.30, 0.15, 0.05],
                  [0.40, 0.30, 0.20, 0.10],
                  [0.40, 0.30, 0.20, 0.10],
                  [0.10, 0.45, 0.45, 0.00]])
LABELS = np.array([0, 1, 2, 3, 2])


# top-1 counts the tied row (as tf.math.in_top_k does), accuracy (argmax) does not
@pytest.mark.parametrize("k, expected", [(1, 2 / 5), (2, 3 / 5), (3, 4 / 5), (4, 1.0)])
def test_top_k_accuracy_counts_the_true_class_among_the_k_highest(k, expected):
    metrics, _, _ = compute_metrics(PROBS, LABELS, CLASSES, k)
    assert metrics[f"top{k}_accuracy"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(1 / 5)  # argmax of the tied row is b, not c
    assert metrics["size"] == 5.0


def test_loss_is_the_mean_cross_entropy_of_the_true_class():
    metrics, per_class, _ = compute_metrics(PROBS, LABELS, CLASSES, 2)
    expected = -np.mean(np.log([0.70, 0.30, 0.20, 0.10, 0.45]))
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert {c: v["support"] for c, v in per_class.items()} == {"a": 1, "b": 1, "c": 2, "d": 1}
    assert per_class["a"]["recall"] == 1.0 and per_class["c"]["recall"] == 0.0
