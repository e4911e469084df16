"""`finetune predict`: class names with probabilities for image files, from a trained model.

The model's own label map gives the class names and the input size, and its preprocessing is a layer
inside the model, so images are decoded and resized exactly as in training (finetune.data.load_image's
decode_file) and fed as raw 0..255 RGB: training and serving cannot diverge.

Writes predictions.csv to the output folder (and `predict.output`, .csv or .json, when given).
Predict does not create an MLflow run: it changes nothing about a model and its results are files.
(Resolving a run id or models:/ URI reads the MLflow store named by `tracking`.)
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from finetune.config.schema import choice
from finetune.errors import ConfigError, DataError
from finetune.app.checks import positive_int
from finetune.progress_bar import progress_bar

OUTPUT_SUFFIXES = (".csv", ".json")
MAX_ROWS_SHOWN = 200        # the printed table stops here; the files hold every image


def run(cfg, output_dir: Path) -> dict:
    """Check options and images, resolve the model, predict, print, write files. Returns a summary."""
    opts = cfg.predict
    top_k = positive_int("predict.top_k", opts.top_k)
    batch_size = positive_int("predict.batch_size", opts.batch_size)
    output = _output_path(opts.output)
    from finetune.data.images import list_images

    paths = list_images(cfg.images)

    from finetune.model.load import resolve_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bundle = resolve_model(cfg.model, cfg.tracking, output_dir / "model", safe_mode=bool(cfg.model_safe_mode))
    classes = bundle.class_names
    k = min(top_k, len(classes))
    print(f"predicting {len(paths)} image(s) with {cfg.model} ({len(classes)} classes, "
          f"input {bundle.input_shape[0]}x{bundle.input_shape[1]})", flush=True)

    model = bundle.load(safe_mode=bool(cfg.model_safe_mode))
    tta = choice(opts.tta)
    probs = predict_files(model, paths, bundle.input_shape[:2], batch_size, tta)
    if probs.shape[1] != len(classes):
        raise ConfigError("model", cfg.model, f"a model whose output ({probs.shape[1]} classes) matches "
                                              f"its label_map.json ({len(classes)} classes)")
    rows = _rows(paths, probs, classes, k)
    _print_table(rows, k)
    csv_path = output_dir / "predictions.csv"
    write_csv(csv_path, rows, classes)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".json":
            write_json(output, rows, classes, str(cfg.model))
        else:
            write_csv(output, rows, classes)
    counts = {c: 0 for c in classes}
    for row in rows:
        counts[row["label"]] += 1
    print("\n== finetune predict: done ==")
    print(f"  images                   {len(rows)}")
    print(f"  model                    {cfg.model}" + (f" (run {bundle.run_id})" if bundle.run_id else ""))
    if tta != "none":
        print(f"  test-time augmentation   {tta} (probabilities averaged over its views)")
    print("  predicted classes        " + ", ".join(f"{c}: {n}" for c, n in counts.items() if n))
    print(f"  predictions              {csv_path}")
    if output is not None:
        print(f"  written to               {output}")
    return {"images": len(rows), "predictions": str(output or csv_path)}


# -- options --------------------------------------------------------------------------------------


def _output_path(value) -> Path | None:
    if value is None or str(value) == "":
        return None
    path = Path(str(value)).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError("predict.output", str(value), "a file name ending in .csv or .json (or null)")
    if path.is_dir():
        raise ConfigError("predict.output", str(value), "a file path, not a folder")
    return path.resolve()


# -- prediction -----------------------------------------------------------------------------------
def predict_files(model, paths: list[str], image_size, batch_size: int, tta: str = "none") -> np.ndarray:
    """Probabilities [N, classes] for image files, in order; images decoded/resized as in training;
    `tta`: averaged over the views of finetune.model.tta."""
    import tensorflow as tf

    from finetune.data.pipeline import decode_file
    from finetune.model import tta as test_time

    hw = (int(image_size[0]), int(image_size[1]))
    ds = (tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=object).astype(str))
          .map(lambda p: tf.cast(decode_file(p, hw), tf.float32), num_parallel_calls=tf.data.AUTOTUNE,
               deterministic=True)
          .batch(batch_size)
          .prefetch(tf.data.AUTOTUNE))
    num_batches = -(-len(paths) // batch_size)
    iterator, out = iter(ds), []
    with progress_bar(len(paths), "predicting", "images") as bar:
        for index in range(num_batches):
            try:
                images = next(iterator)
            except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
                raise _bad_file(paths[index * batch_size:(index + 1) * batch_size], hw, error) from None
            out.append(test_time.predict(model, images, tta, "predict.tta").astype(np.float32))
            bar.update(int(images.shape[0]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _bad_file(batch_paths: list[str], hw, error) -> DataError:
    """Name the file of a failed batch that cannot be read or decoded."""
    from finetune.data import load_image

    for path in batch_paths:
        try:
            load_image(path, hw)
        except Exception as inner:  # noqa: BLE001 - any failure names this file
            detail = str(getattr(inner, "message", inner)).splitlines()[0][:200]
            return DataError(f"images: cannot read or decode '{path}' ({detail})")
    detail = str(getattr(error, "message", error)).splitlines()[0][:200]
    return DataError(f"images: cannot read or decode one of {batch_paths[:3]}... ({detail})")


def _rows(paths, probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for path, p, top in zip(paths, probs, order):
        rows.append({"path": str(path), "label": classes[int(top[0])], "probability": float(p[top[0]]),
                     "top_k": [(classes[int(i)], float(p[i])) for i in top],
                     "probabilities": {c: float(v) for c, v in zip(classes, p)}})
    return rows


# -- output ---------------------------------------------------------------------------------------
def _top_text(row) -> str:
    return " ".join(f"{c}:{p:.4f}" for c, p in row["top_k"])


def _print_table(rows: list[dict], k: int) -> None:
    shown = rows[:MAX_ROWS_SHOWN]
    width = min(max([len("image")] + [len(r["path"]) for r in shown]), 80)
    label_w = max([len("predicted")] + [len(r["label"]) for r in shown])
    print(f"\n{'image':<{width}}  {'predicted':<{label_w}}  {'prob':>6}  top-{k}")
    for row in shown:
        path = row["path"] if len(row["path"]) <= width else "..." + row["path"][-(width - 3):]
        print(f"{path:<{width}}  {row['label']:<{label_w}}  {row['probability']:>6.4f}  {_top_text(row)}")
    if len(rows) > len(shown):
        print(f"... and {len(rows) - len(shown)} more image(s): see the predictions file")
    sys.stdout.flush()


def write_csv(path: Path, rows: list[dict], classes: list[str]) -> None:
    """path, label, probability, top_k ('class:prob ...'), then one prob_<class> column per class."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability", "top_k", *(f"prob_{c}" for c in classes)])
        for row in rows:
            writer.writerow([row["path"], row["label"], f"{row['probability']:.6f}", _top_text(row),
                             *(f"{row['probabilities'][c]:.6f}" for c in classes)])


def write_json(path: Path, rows: list[dict], classes: list[str], model_ref: str) -> None:
    payload = {"model": model_ref, "class_names": classes, "predictions": [
        {"path": r["path"], "label": r["label"], "probability": r["probability"],
         "top_k": [{"class": c, "probability": p} for c, p in r["top_k"]],
         "probabilities": r["probabilities"]} for r in rows]}
    path.write_text(json.dumps(payload, indent=1))
