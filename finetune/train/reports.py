"""What a run reports at the end: per-class metrics, confusion matrix and training-curve plots."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts (scikit-learn's confusion_matrix with labels=range(num_classes);
    numpy here, so that a run never imports scikit-learn: ~0.8 s a process on 2 cores)."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, from a confusion matrix; 0 where a ratio has nothing to divide by (scikit-learn's
    zero_division=0)."""
    hits = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return precision, recall, f1


def per_class_metrics(y_true, y_pred, class_names: list[str]) -> dict[str, float]:
    """{"<split>_precision_<class>": ...} style dict without the split prefix."""
    precision, recall, f1 = precision_recall_f1(confusion_matrix(y_true, y_pred, len(class_names)))
    out = {}
    for i, name in enumerate(class_names):
        out[f"precision_{name}"] = float(precision[i])
        out[f"recall_{name}"] = float(recall[i])
        out[f"f1_{name}"] = float(f1[i])
    out["macro_f1"] = float(np.mean(f1))
    return out


def plot_confusion_matrix(y_true, y_pred, class_names: list[str], path, title: str) -> np.ndarray:
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    size = max(4.0, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return matrix


def plot_training_curves(history: dict[str, list[float]], stage_starts: list[tuple[str, int]], path):
    """Loss and accuracy per epoch (train and validation), a dashed line where each stage starts."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        for name, start in stage_starts[1:]:
            ax.axvline(start + 0.5, color="grey", linestyle=":")
            ax.text(start + 0.6, ax.get_ylim()[1], name, va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    # fixed margins: the two panels never change shape, and tight_layout's extra draw is a third of the plot's
    # time (~0.05 s of 0.15 s on 2 cores), paid by every sweep trial
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.18)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_image_grid(images, titles: list[str], path, title: str, columns: int = 4) -> None:
    """Images (float 0..255, [n, h, w, 3]) in a grid with a title each: what the model is fed. One canvas
    in one axes (16 axes and their layout took twice as long to draw), each image shown at an integer
    scale of at least 128 pixels, without resampling."""
    from matplotlib.figure import Figure

    images = [np.clip(np.asarray(image), 0, 255).astype(np.uint8) for image in images]
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    scale = max(1, -(-128 // min(h, w)))
    gap, label = max(2, 8 // scale), max(4, 16 // scale)  # canvas pixels between images, above each for its title
    rows = max(1, -(-len(images) // columns))
    canvas = np.full((rows * (label + h + gap), columns * (w + gap) - gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (label + h + gap) + label, column * (w + gap)
        canvas[top:top + image.shape[0], left:left + image.shape[1]] = image[..., :3]
    header = 28  # screen pixels for the title
    height, width = canvas.shape[0] * scale, canvas.shape[1] * scale
    fig = Figure(figsize=(width / 80, (height + header) / 80))
    ax = fig.add_axes((0, 0, 1, height / (height + header)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for index, text in enumerate(titles[:len(images)]):
        row, column = divmod(index, columns)
        ax.text(column * (w + gap) + w / 2, row * (label + h + gap) + label - 1, text, ha="center", va="bottom",
                fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
