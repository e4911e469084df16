"""`finetune evaluate`: a trained model's metrics on one split of a dataset, recorded in MLflow.

Loss (sparse categorical cross-entropy), accuracy, top-k accuracy (k = min(evaluate.top_k, classes)),
per-class precision/recall/F1/support, a confusion matrix (PNG + CSV) and per-image predictions.
Everything is computed from one pass of predicted probabilities, so the numbers agree with each
other and with `finetune predict` on the same files.

Where it is logged: the model's own MLflow run (when the model came from one, the run is FINISHED and
`evaluate.log_to_model_run` is true), else a new run in `tracking.experiment` tagged with the model
reference. Metrics are named `eval_<split>_<metric>`, artifacts go under `evaluation/<split>/`.
When the requested split does not exist (folder data has no test split by default), the
validation split is evaluated instead, with a printed note; the metric names say which split it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.config.schema import choice
from finetune.errors import ConfigError, DataError
from finetune.model.predict_fn import predict_batch
from finetune.tracking.store import metric_key
from finetune.app.checks import positive_int

SPLITS = ("test", "val", "train")


def run(cfg, output_dir: Path) -> dict:
    opts = cfg.evaluate
    split = _split(opts.split)
    batch_size = positive_int("evaluate.batch_size", opts.batch_size)
    top_k = positive_int("evaluate.top_k", opts.top_k)
    from finetune.data import load_dataset  # pure Python for shapes/digits/folder: no TF yet

    dataset = load_dataset(cfg.data)
    split = _available_split(dataset, split)

    from finetune.model.load import resolve_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bundle = resolve_model(cfg.model, cfg.tracking, output_dir / "model", safe_mode=bool(cfg.model_safe_mode))
    label_order = _label_order(dataset, bundle.class_names)
    classes = bundle.class_names
    k = min(top_k, len(classes))
    size = getattr(dataset, split).size
    print(f"evaluating {cfg.model} on {dataset.name} ({split}: {size} images, {len(classes)} classes)",
          flush=True)

    from finetune import tracking

    model_run = _model_run(cfg, bundle)  # evaluated from that run's model: add to it
    with tracking.run(cfg, command="evaluate", output_dir=output_dir, add_to_run_id=model_run,
                      run_name=f"evaluate {split}", tags=_new_run_tags(cfg, bundle)) as run:
        tta = choice(opts.tta)
        probs, labels, paths, plain = _predict_split(bundle, dataset, split, batch_size, bool(cfg.model_safe_mode),
                                                     tta)
        labels = label_order[labels]  # dataset label index -> model class index
        metrics, per_class, matrix = compute_metrics(probs, labels, classes, k)
        if plain is not None:  # the same metrics without test-time augmentation, to compare
            without, _, _ = compute_metrics(plain, labels, classes, k)
            metrics.update({f"{name}_without_tta": value for name, value in without.items()})
        files = _write_files(output_dir, split, dataset.name, str(cfg.model), classes, metrics, per_class,
                             matrix, probs, labels, paths)
        prefixed = {f"eval_{split}_{metric_key(name)}": value for name, value in metrics.items()}
        prefixed.update({f"eval_{split}_{metric_key(f'{m}_{c}')}": per_class[c][m]
                         for c in classes for m in ("precision", "recall", "f1")})
        run.log_metrics(prefixed)
        run.set_tags({f"eval_{split}_dataset": dataset.name, f"eval_{split}_top_k": str(k),
                      f"eval_{split}_tta": tta})
        for path in files:
            run.log_artifact(path, f"evaluation/{split}")
    _print_summary(metrics, per_class, classes, split, k, output_dir, run.run_id, run.experiment_id, run.uri,
                   "the model's run" if model_run else "a new run")
    return prefixed


# -- options and data -----------------------------------------------------------------------------


def _split(value) -> str:
    value = {"validation": "val"}.get(str(value), str(value))
    if value not in SPLITS:
        from finetune.errors import did_you_mean

        raise ConfigError("evaluate.split", value, "one of " + ", ".join(SPLITS) + did_you_mean(value, SPLITS))
    return value


def _available_split(dataset, split: str) -> str:
    part = getattr(dataset, split)
    if part is not None and part.size:
        return split
    if split == "test" and dataset.val is not None and dataset.val.size:
        print(f"note: {dataset.name} has no test split; evaluating the validation split instead "
              "(set data.test_split > 0 or data.test_path for a test set)", flush=True)
        return "val"
    raise DataError(f"evaluate.split: {dataset.name} has no {split} split (or it is empty); "
                    "choose another with evaluate.split=test|val|train")


def _label_order(dataset, model_classes: list[str]) -> np.ndarray:
    """Index array mapping the dataset's labels to the model's; the class names must be the same."""
    data_classes = list(dataset.class_names)
    if sorted(data_classes) != sorted(model_classes) or len(set(data_classes)) != len(data_classes):
        missing = [c for c in model_classes if c not in data_classes]
        extra = [c for c in data_classes if c not in model_classes]
        detail = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                              f"not in the model {extra}" if extra else "") if part)
        raise ConfigError("data", f"{dataset.name} with classes {data_classes}",
                          f"a dataset with the model's classes {model_classes}"
                          + (f" ({detail})" if detail else ""))
    if data_classes != model_classes:
        print(f"note: {dataset.name} lists the classes in another order than the model; labels are mapped "
              "by class name", flush=True)
    return np.asarray([model_classes.index(c) for c in data_classes], np.int64)


def _predict_split(bundle, dataset, split: str, batch_size: int, safe_mode: bool = True, tta: str = "none"):
    """(probabilities, labels, paths, probabilities without TTA: None when tta is none)."""
    from finetune.data import make_pipeline
    from finetune.model import tta as test_time

    model = bundle.load(safe_mode=safe_mode)
    ds = make_pipeline(dataset, split, bundle.input_shape[:2], batch_size, training=False,
                       seed=0, cache="off")
    probs, plain, labels = [], [], []
    for images, y in ds:
        probs.append(test_time.predict(model, images, tta, "evaluate.tta"))
        if tta != "none":
            plain.append(predict_batch(model, images).astype(np.float64))
        labels.append(y.numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels).astype(np.int64)
    plain = np.concatenate(plain) if plain else None
    if probs.shape[1] != len(bundle.class_names):
        raise ConfigError("model", str(bundle.model_path),
                          f"a model whose output ({probs.shape[1]} classes) matches its label_map.json "
                          f"({len(bundle.class_names)} classes)")
    part = getattr(dataset, split)
    paths = list(part.paths) if part.paths is not None else [""] * len(labels)
    return probs, labels, paths, plain


# -- metrics --------------------------------------------------------------------------------------
def compute_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], k: int):
    """({loss, accuracy, top<k>_accuracy, macro_f1, size}, {class: {precision, recall, f1, support}},
    confusion matrix). The loss is Keras' sparse categorical cross-entropy on probabilities."""
    from finetune.train import reports
    eps = 1e-7  # keras.config.epsilon(): what Keras clips probabilities to before the log
    p = probs / np.sum(probs, axis=1, keepdims=True)
    true_p = np.clip(p[np.arange(len(labels)), labels], eps, 1 - eps)
    predicted = np.argmax(probs, axis=1)
    # top-k as in_top_k: the true class is among the k highest (ties count in its favour)
    rank = np.sum(probs > probs[np.arange(len(labels)), labels][:, None], axis=1)
    scores = reports.per_class_metrics(labels, predicted, classes)
    support = np.bincount(labels, minlength=len(classes))
    per_class = {c: {"precision": scores[f"precision_{c}"], "recall": scores[f"recall_{c}"],
                     "f1": scores[f"f1_{c}"], "support": int(support[i])} for i, c in enumerate(classes)}
    metrics = {"loss": float(np.mean(-np.log(true_p))), "accuracy": float(np.mean(predicted == labels)),
               f"top{k}_accuracy": float(np.mean(rank < k)), "macro_f1": scores["macro_f1"],
               "size": float(len(labels))}
    return metrics, per_class, reports.confusion_matrix(labels, predicted, len(classes))




# -- files ----------------------------------------------------------------------------------------
def _write_files(out: Path, split, dataset_name, model_ref, classes, metrics, per_class, matrix,
                 probs, labels, paths) -> list[Path]:
    import csv

    from finetune.train import reports
    folder = out / "evaluation" / split
    folder.mkdir(parents=True, exist_ok=True)
    predicted = np.argmax(probs, axis=1)
    png = folder / "confusion_matrix.png"
    reports.plot_confusion_matrix(labels, predicted, classes, png, f"{model_ref} on {dataset_name} ({split})")
    matrix_csv = folder / "confusion_matrix.csv"  # rows: true class, columns: predicted class
    np.savetxt(matrix_csv, matrix, fmt="%d", delimiter=",", header=",".join(classes), comments="")
    per_class_csv = folder / "per_class.csv"
    with open(per_class_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for c in classes:
            row = per_class[c]
            writer.writerow([c, f"{row['precision']:.6f}", f"{row['recall']:.6f}", f"{row['f1']:.6f}",
                             row["support"]])
    predictions_csv = folder / "predictions.csv"
    with open(predictions_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "predicted", "probability", *(f"prob_{c}" for c in classes)])
        for path, y, guess, p in zip(paths, labels, predicted, probs):
            writer.writerow([path, classes[int(y)], classes[int(guess)], f"{p[guess]:.6f}",
                             *(f"{v:.6f}" for v in p)])
    metrics_json = folder / "metrics.json"
    metrics_json.write_text(json.dumps({"model": model_ref, "dataset": dataset_name, "split": split,
                                        "metrics": metrics, "per_class": per_class}, indent=1))
    return [png, matrix_csv, per_class_csv, predictions_csv, metrics_json]


# -- MLflow ---------------------------------------------------------------------------------------
def _model_run(cfg, bundle) -> str | None:
    """The model's own run, when the evaluation is to be added to it (it came from a FINISHED run)."""
    from finetune.tracking import tracking_uri
    from finetune.tracking.scope import run_info

    if not (bundle.run_id and cfg.evaluate.log_to_model_run):
        return None
    status = run_info(tracking_uri(cfg.tracking), bundle.run_id).status
    if status != "FINISHED":
        print(f"note: the model's run {bundle.run_id} is {status}; logging to a new run", flush=True)
        return None
    return bundle.run_id


def _new_run_tags(cfg, bundle) -> dict:
    from finetune.tracking.scope import MODEL_REF_TAG, MODEL_RUN_TAG

    return {MODEL_REF_TAG: str(cfg.model), **({MODEL_RUN_TAG: bundle.run_id} if bundle.run_id else {})}


# -- summary --------------------------------------------------------------------------------------
def _print_summary(metrics, per_class, classes, split, k, out, run_id, experiment_id, uri, where) -> None:
    from finetune.tracking.store import ui_hint

    print(f"\n== finetune evaluate: {split} split ==")
    for name in ("loss", "accuracy", f"top{k}_accuracy", "macro_f1"):
        without = metrics.get(f"{name}_without_tta")
        print(f"  {name:<24} {metrics[name]:.4f}" + (f"   (without TTA: {without:.4f})" if without is not None else ""))
    print(f"  {'images':<24} {int(metrics['size'])}")
    width = max([len("class")] + [len(c) for c in classes])
    print(f"\n  {'class':<{width}}  precision  recall      f1  support")
    for c in classes:
        row = per_class[c]
        print(f"  {c:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  {row['f1']:>6.4f}  "
              f"{row['support']:>7d}")
    print(f"\n  run id                   {run_id} ({where}; metrics eval_{split}_*, "
          f"artifacts evaluation/{split}/)")
    print(f"  outputs                  {out / 'evaluation' / split}")
    print(f"  look at it               {ui_hint(uri, experiment_id, run_id)}")
