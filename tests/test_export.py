"""`finetune export` end to end through the real CLI, on the session's tiny model; the check logic alone."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from finetune import exporting
from tests.conftest import one_error_line, runs_of

pytestmark = pytest.mark.slow


def _artifacts(client, run_id, path=""):
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _run_tflite(path, images):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return interpreter, inp, out, interpreter.get_tensor(out["index"])


def test_float_exports_agree_and_land_in_the_models_run(cli, mlflow_client, trained_model, tmp_path):
    out = tmp_path / "exported"
    runs_before = len(runs_of(mlflow_client, "fixture_trained_model"))
    result = cli("export", f"model={trained_model['run_id']}", "export.formats=[keras,saved_model,tflite]",
                 "export.quantize=none", f"export.output={out}", "export.check_samples=16",
                 experiment="fixture_trained_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max abs diff" in result.stdout and "top-1 agree" in result.stdout

    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["check_images"] == 16
    rows = {row["format"]: row for row in report["exports"]}
    assert set(rows) == {"keras", "saved_model", "tflite"}
    for row in rows.values():
        assert row["top1_agreement"] == 1.0 and row["decisive_disagreements"] == 0, row
        assert row["max_abs_diff"] < 1e-4, row
        assert row["size_kb"] > 100 and row["status"] == "ok"
    assert rows["tflite"]["io"] == "float32 -> float32"
    assert (out / "model.keras").is_file() and (out / "model.tflite").is_file()
    assert (out / "saved_model" / "saved_model.pb").is_file() and (out / "label_map.json").is_file()

    # The files stand on their own: the .keras in safe mode and the TFLite in a bare interpreter.
    from finetune.model_source import load_model

    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    expected = load_model(out / "model.keras").predict_on_batch(images)
    *_, probs = _run_tflite(out / "model.tflite", images)
    np.testing.assert_allclose(probs, expected, atol=1e-4)

    # Logged into the training run, whose status stays FINISHED.
    run = mlflow_client.get_run(trained_model["run_id"])
    assert run.info.status == "FINISHED"
    paths = _artifacts(mlflow_client, run.info.run_id, "export")
    for name in ("model.keras", "model.tflite", "export_report.json", "label_map.json",
                 "saved_model/saved_model.pb"):
        assert f"export/{name}" in paths, (name, sorted(paths))
    assert run.data.metrics["export_tflite_top1_agreement"] == 1.0
    assert run.data.tags["export.check"] == "passed"
    assert len(runs_of(mlflow_client, "fixture_trained_model")) == runs_before  # no new run


def test_int8_tflite_runs_and_reports_agreement(cli, mlflow_client, trained_model, tmp_path):
    out = tmp_path / "int8"
    result = cli("export", f"model={trained_model['model_dir'] / 'model.keras'}", "export.formats=[tflite]",
                 "export.quantize=int8", f"export.output={out}", "export.check_samples=8",
                 "export.representative_samples=16", experiment="export_int8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    (row,) = report["exports"]
    assert row["format"] == "tflite_int8" and row["file"] == "model_int8.tflite"
    assert 0.0 <= row["top1_agreement"] <= 1.0 and np.isfinite(row["max_abs_diff"])
    assert row["io"] == "float32 -> float32" and report["tflite_int8_io"] == "float32"
    assert report["representative_images"] == 16
    assert row["status"] in ("ok", "warning")  # quantized exports never fail on agreement
    assert not (out / "saved_model").exists()  # the SavedModel it was converted from was temporary

    # Float I/O around integer kernels: the weights inside are int8, and it runs on raw 0..255 images.
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    interpreter, inp, out_detail, probs = _run_tflite(out / "model_int8.tflite", images)
    assert inp["dtype"] == np.float32 and out_detail["dtype"] == np.float32
    assert any(t["dtype"] == np.int8 for t in interpreter.get_tensor_details())
    assert probs.shape == (3, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=0.05)
    # int8 weights: well under half the float32 .keras file
    float_kb = (trained_model["model_dir"] / "model.keras").stat().st_size / 1024
    assert row["size_kb"] < 0.5 * float_kb

    # A model without a run (a plain path): a new run of its own, finished, holding the artifacts.
    (run,) = runs_of(mlflow_client, "export_int8")
    assert run.info.status == "FINISHED" and run.data.params["quantize"] == "int8"
    assert {"export/model_int8.tflite", "export/export_report.json"} <= _artifacts(mlflow_client, run.info.run_id)


@pytest.mark.parametrize("args, expected", [
    (["export.formats=[keras,tflight]"], "export.formats: received 'tflight'; expected each one of keras, "
                                         "saved_model, tflite (did you mean 'tflite'?)"),
    (["export.formats=[keras,saved_model]", "export.quantize=int8"],
     "export.quantize: received 'int8'; expected none unless export.formats includes tflite"),
    (["export.formats=[]"], "export.formats: received []; expected a non-empty list"),
])
def test_bad_options_are_one_line(cli, args, expected):
    # checked before the model is even looked up, so no model is needed
    line = one_error_line(cli("export", "model=no/such/model.keras", *args))
    assert line.startswith(f"error: {expected}"), line


def test_compare_and_judge():
    reference = np.array([[0.7, 0.2, 0.1], [0.3333, 0.3336, 0.3331], [0.1, 0.1, 0.8]])
    same_order = reference + 1e-6
    result = exporting.compare(reference, same_order)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] == pytest.approx(1e-6)
    assert exporting.judge("tflite", "none", result) == (None, None)

    # Flipping a near-tie (top two 0.0003 apart) is noise; flipping a clear winner fails a float export.
    near_tie = reference.copy()
    near_tie[1] = [0.3333, 0.3330, 0.3337]
    result = exporting.compare(reference, near_tie)
    assert result["near_ties"] == 1 and result["decisive_disagreements"] == 0
    assert exporting.judge("tflite_float16", "float16", result)[0] is None

    flipped = reference.copy()
    flipped[0] = [0.2, 0.7, 0.1]
    result = exporting.compare(reference, flipped)
    assert result["decisive_disagreements"] == 1 and result["top1_agreement"] == pytest.approx(2 / 3)
    failure, _ = exporting.judge("saved_model", None, result)
    assert failure and "1 of 3" in failure
    failure, warning = exporting.judge("tflite_int8", "int8", result)  # quantized: a warning, not a failure
    assert failure is None and "67%" in warning

    nan = reference.copy()
    nan[2] = np.nan
    assert exporting.judge("tflite_dynamic", "dynamic", exporting.compare(reference, nan))[0]
