"""`finetune export`: a trained model as .keras / SavedModel / TFLite / ONNX, each loaded back and checked.

Every artifact is loaded back and run on the same check images as the Keras model (ONNX with
onnxruntime). Float exports (keras, saved_model, tflite none/float16, onnx) must pick the same top-1
class on every check image (a near-tie in the Keras model, top two within `exporting.TIE_MARGIN`, is
reported, not failed); quantized TFLite (dynamic, int8) reports its agreement and warns below 90%.
The artifacts and `export_report.json` are logged to the model's MLflow run (under `export/`) or, for
a model with no run, to a new run.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from finetune.progress_bar import progress_bar
from finetune.model import export as exporting
from finetune.model.predict_fn import predict_batch
from finetune.errors import ConfigError, DataError


def run(cfg, output_dir: Path) -> dict:
    formats, quantize = exporting.validate_options(cfg.export)  # before anything heavy
    from finetune.model.load import resolve_model

    output_dir = Path(output_dir)
    out = Path(cfg.export.output).expanduser() if cfg.export.output else output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("export.output" if cfg.export.output else "hydra.run.dir", str(out),
                          f"a folder this user can create and write ({error.strerror})") from None
    bundle = resolve_model(cfg.model, cfg.tracking, output_dir / "source_model", safe_mode=bool(cfg.model_safe_mode))
    data_cfg = cfg.data if cfg.data is not None else (bundle.config.data if bundle.config is not None
                                                      and "data" in bundle.config else None)
    if data_cfg is None:
        raise ConfigError("data", None, "data=<source> (shapes, digits, folder, tfds): the model has no "
                                        "training config beside it to take its data from")
    check, check_splits, calibration = _images(data_cfg, bundle, cfg.export,
                                               need_calibration=quantize == "int8")

    safe_mode = bool(cfg.model_safe_mode)
    model = exporting.load_for_export(bundle.model_path, safe_mode)  # no optimizer state
    reference = predict_batch(model, check).astype(np.float32, copy=False)  # what every export must reproduce
    rows, failures, warnings = [], [], []
    written: dict[str, Path] = {}
    with progress_bar(len(formats), "exporting and checking", "formats") as bar:
        for fmt in sorted(formats, key=exporting.FORMATS.index):  # the SavedModel before the TFLite made from it
            bar.set_postfix_str(fmt)
            rows.append(_export_one(fmt, quantize if fmt == "tflite" else None, model, out, written, check,
                                    reference, calibration, failures, warnings, safe_mode))
            bar.update(1)

    label_map = out / "label_map.json"  # what a TFLite / Serving client needs to name the classes
    if label_map.resolve() != (bundle.model_path.parent / "label_map.json").resolve():
        label_map.write_text(json.dumps(bundle.label_map, indent=1))
    report = {
        "model": str(cfg.model), "model_path": str(bundle.model_path), "run_id": bundle.run_id,
        "quantize": quantize, "tflite_int8_io": "float32" if quantize == "int8" else None,
        "check_images": int(len(check)), "check_splits": check_splits,
        "representative_images": int(len(calibration)) if calibration is not None else 0,
        "tie_margin": exporting.TIE_MARGIN, "exports": rows, "warnings": warnings,
        "failures": failures, "passed": not failures, "output": str(out),
    }
    (out / "export_report.json").write_text(json.dumps(report, indent=1))
    _print(report)
    _log(cfg, bundle, out, output_dir, rows, report, formats)
    return report


def _images(data_cfg, bundle, export, need_calibration: bool):
    """(check images, the splits they came from, calibration images or None), float32 0..255."""
    from finetune.data import load_dataset

    dataset = load_dataset(data_cfg)
    size = tuple(bundle.input_shape[:2])
    # test first, then val, then train: this is a numerical check, so any images will do, and more
    # images than a small test split give it more to bite on
    order = [s for s in ("test", "val", "train") if _split_size(dataset, s)]
    if not order:
        raise DataError(f"{dataset.name}: no images to check the exports on")
    check, used = _take(dataset, order, size, int(export.check_samples))
    calibration = None
    if need_calibration:
        calibration, _ = _take(dataset, [s for s in ("train", "val") if _split_size(dataset, s)] or order,
                               size, int(export.representative_samples))
    return check, used, calibration


def _split_size(dataset, split: str) -> int:
    part = getattr(dataset, split, None)
    return int(part.size) if part is not None else 0


def _take(dataset, splits, size, count: int):
    from finetune.data import make_pipeline

    images, used = [], {}
    have = 0
    for split in splits:
        if have >= count:
            break
        for batch, _ in make_pipeline(dataset, split, size, batch_size=min(count, 64), training=False,
                                      seed=0, cache="off"):
            batch = batch.numpy()[: count - have]
            images.append(batch)
            used[split] = used.get(split, 0) + len(batch)
            have += len(batch)
            if have >= count:
                break
    return np.concatenate(images).astype(np.float32), used


def _export_one(fmt, quantize, model, out: Path, written: dict, check, reference, calibration,
                failures, warnings, safe_mode: bool = True) -> dict:
    name = exporting.label(fmt, quantize)
    start = time.perf_counter()
    if fmt == "keras":
        path = exporting.write_keras(model, out)
        predict = exporting.keras_predictor(path, safe_mode)
    elif fmt == "saved_model":
        path = written["saved_model"] = exporting.write_saved_model(model, out / "saved_model")
        predict = exporting.saved_model_predictor(path)
    elif fmt == "onnx":
        path = exporting.write_onnx(model, out / "model.onnx")
        predict = exporting.onnx_predictor(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            saved = written.get("saved_model")
            if saved is None:  # tflite without saved_model: convert through a temporary SavedModel
                saved = exporting.write_saved_model(model, Path(tmp) / "saved_model")
            path = exporting.write_tflite(saved, out / exporting.tflite_name(quantize), quantize, calibration)
        predict = exporting.tflite_predictor(path)
    seconds = time.perf_counter() - start
    result = exporting.compare(reference, predict(check))
    failure, warning = exporting.judge(name, quantize, result)
    if failure:
        failures.append(failure)
    if warning:
        warnings.append(warning)
    row = {"format": name, "file": path.name + ("/" if path.is_dir() else ""), "path": str(path),
           "size_kb": exporting.size_bytes(path) / 1024, **result,
           "status": "FAILED" if failure else ("warning" if warning else "ok"), "seconds": round(seconds, 2)}
    if fmt in ("tflite", "onnx"):
        row["io"] = getattr(predict, "io", None)
    return row


def _print(report: dict) -> None:
    print(f"\n== finetune export: {report['check_images']} check image(s) from "
          + ", ".join(f"{k} ({v})" for k, v in report["check_splits"].items()) + " ==")
    print(exporting.format_table(report["exports"]))
    for row in report["exports"]:
        if row["near_ties"]:
            print(f"  note: {row['format']}: {row['near_ties']} top-1 difference(s) on image(s) where the "
                  f"Keras model's top two are within {exporting.TIE_MARGIN:g} (near-ties; never a failure)")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")
    for failure in report["failures"]:
        print(f"  FAILED: {failure}")
    print(f"  outputs                  {report['output']}")


def _log(cfg, bundle, out: Path, output_dir: Path, rows, report, formats) -> None:
    """Artifacts, metrics and the report to the model's run (its status untouched), else a new run; a failed
    check raises inside the run, which ends FAILED (a new run) or gets an `export.error` tag (the model's)."""
    from finetune import tracking
    from finetune.tracking.scope import MODEL_REF_TAG, MODEL_RUN_TAG

    metrics = {}
    for row in rows:
        for key in ("max_abs_diff", "top1_agreement", "size_kb"):
            if row[key] == row[key]:  # not NaN
                metrics[f"export_{row['format']}_{key}"] = float(row[key])
    files = [Path(row["path"]) for row in rows] + [out / "export_report.json", out / "label_map.json"]
    tags = {MODEL_REF_TAG: str(cfg.model)[:500], **({MODEL_RUN_TAG: bundle.run_id} if bundle.run_id else {})}
    with tracking.run(cfg, command="export", output_dir=output_dir, add_to_run_id=bundle.run_id,
                      run_name="export", tags=tags) as run:
        report["mlflow_run_id"] = run.run_id
        (out / "export_report.json").write_text(json.dumps(report, indent=1))  # now with the run id
        if not bundle.run_id:
            run.log_params({"model": str(cfg.model)[:500], "formats": ",".join(formats),
                            "quantize": report["quantize"], "check_images": report["check_images"]})
        for path in (f for f in files if f.exists()):
            run.log_artifact(path, f"export/{path.name}" if path.is_dir() else "export")
        run.log_metrics(metrics)
        run.set_tags({"export.formats": ",".join(formats), "export.quantize": report["quantize"],
                      "export.check": "passed" if report["passed"] else "failed"})
        where = "  (the model's run, under export/)" if bundle.run_id else ""
        print(f"  mlflow run               {run.run_id}{where}")
        if report["failures"]:
            raise exporting.ExportCheckError("export check failed: " + "; ".join(report["failures"])
                                             + f" (report: {out / 'export_report.json'})")
