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


@pytest.mark.parametrize("seed", range(3))
def test_numpy_per_class_metrics_equal_scikit_learn(seed):
    """finetune.train.reports computes them with numpy (a run no longer imports scikit-learn): the same
    numbers as scikit-learn's, classes never predicted or never present (zero_division=0) included."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from finetune.train import reports

    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 5, 40), rng.integers(0, 4, 40)  # class 4 is never predicted
    y_true[y_true == 3] = 0  # class 3 never present
    names = list("abcdef")  # class 5 neither
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(6)),
                                                               zero_division=0)
    ours = reports.per_class_metrics(y_true, y_pred, names)
    for i, name in enumerate(names):
        assert ours[f"precision_{name}"] == pytest.approx(precision[i])
        assert ours[f"recall_{name}"] == pytest.approx(recall[i])
        assert ours[f"f1_{name}"] == pytest.approx(f1[i])
    assert ours["macro_f1"] == pytest.approx(np.mean(f1))
    expected = confusion_matrix(y_true, y_pred, labels=list(range(6)))
    assert (reports.confusion_matrix(y_true, y_pred, 6) == expected).all()


def test_the_cli_imports_keras_without_scikit_learn():
    """finetune.app.keras_import: a command process's `import keras` skips scikit-learn (~0.8 s), and
    scikit-learn imports as usual afterwards."""
    import subprocess
    import sys

    code = ("import sys\nfrom finetune.app.keras_import import keras_without_sklearn\n"
            "assert keras_without_sklearn()\nimport keras\nassert 'sklearn' not in sys.modules\n"
            "assert keras.layers.Dense(2) is not None\nimport sklearn.datasets\n"
            "print('ok', len(sklearn.datasets.load_digits().target))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok 1797" in done.stdout, done.stderr[-2000:]
