"""The end of a run: metrics of the final model on val and test, a per-class report and a confusion
matrix, logged with the `final_` prefix for validation metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune import tracking
from finetune.model.predict_fn import predict_batch
from finetune.train import imbalance, reports
from finetune.train.distribute import shard_by_data
from finetune.train.stages import expected_end_of_data


def evaluate_model(model, inputs, class_names: list[str], out: Path, title: str, train_counts=None) -> dict:
    """`model` on `inputs` (images, or features for a head): after a stage on cached features the head on
    those features is the whole model's computation (the backbone ran in inference mode), so no image is
    run again. Writes metrics.json and the confusion matrix into `out`. `train_counts`: training images per
    class; minority classes get their recall said and `<split>_minority_recall` logged."""
    sets = inputs.evaluation_sets()
    metrics = {}
    with expected_end_of_data():
        for split, ds in sets.items():
            if ds is not None:
                metrics.update({f"{split}_{k}": float(v)
                                for k, v in model.evaluate(shard_by_data(ds), verbose=0, return_dict=True).items()})
        split = "test" if sets["test"] is not None else "val"
        y_true, y_pred = predictions(model, sets[split])
    per_class = reports.per_class_metrics(y_true, y_pred, class_names)
    metrics.update({f"{split}_{tracking.metric_key(k)}": v for k, v in per_class.items()})
    if train_counts is not None:
        line, minority = imbalance.minority_summary(train_counts, class_names, per_class, split)
        if line:
            print(line)
        metrics.update(minority)
    matrix = reports.plot_confusion_matrix(y_true, y_pred, class_names, out / "confusion_matrix.png",
                                           f"{title} ({split})")
    np.savetxt(out / "confusion_matrix.csv", matrix, fmt="%d", delimiter=",", header=",".join(class_names),
               comments="")
    final = {f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()}
    tracking.log_metrics(final)
    (out / "metrics.json").write_text(json.dumps(final, indent=1))
    return final


def predictions(model, ds):
    """(true labels, predicted classes) over `ds`."""
    outputs, labels = outputs_and_labels(model, ds)
    y_true = np.argmax(labels, axis=-1) if labels.ndim > 1 else labels  # one-hot under MixUp/CutMix
    return y_true, np.argmax(outputs, axis=-1)


def outputs_and_labels(model, ds, bar=None) -> tuple:
    """(model outputs, labels) over a (x, label) pipeline, as arrays. One pass with predict_on_batch on one
    device; under a distribution strategy model.predict (predict_on_batch hands every replica the whole
    batch and returns it once per replica) and a pass for the labels. `bar`: a progress bar
    (finetune.progress_bar) advanced by the images of each batch (one device)."""
    import tensorflow as tf

    if tf.distribute.has_strategy():
        labels = [batch_labels.numpy() for _, batch_labels in ds]
        with expected_end_of_data():
            return np.asarray(model.predict(shard_by_data(ds), verbose=0)), np.concatenate(labels)
    outputs, labels = [], []
    for inputs, batch_labels in ds:
        outputs.append(predict_batch(model, inputs))
        labels.append(batch_labels.numpy())
        if bar is not None:
            bar.update(len(labels[-1]))
    return np.concatenate(outputs), np.concatenate(labels)
