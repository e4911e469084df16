"""The commands that use a trained model — `finetune predict`, `evaluate` and `export` — end to end through the
real CLI, on the session's tiny model (one file, so one pytest-xdist worker trains that model once); the
export check logic alone.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import warnings

import numpy as np
import pytest

from finetune.model import export as exporting
from tests.conftest import one_error_line, runs_of

pytestmark = pytest.mark.slow


# -- predict and evaluate ------------------------------------------------------------------------------
def _real(path) -> str:
    return os.path.realpath(str(path))


def _read_csv(path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {_real(row["path"]): row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def shapes(trained_model, cache_dir):
    """The fixture model's data: its config as the CLI composes it, the Dataset and the image folder."""
    from hydra import compose, initialize_config_dir

    from finetune.config.paths import conf_dir
    from finetune.config.schema import register_configs
    from finetune.data import load_dataset

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*trained_model["overrides"], "model=unused"])
    old = os.environ.get("FINETUNE_CACHE_DIR")
    os.environ["FINETUNE_CACHE_DIR"] = str(cache_dir)
    try:
        dataset = load_dataset(cfg.data)
    finally:
        if old is None:
            os.environ.pop("FINETUNE_CACHE_DIR")
        else:
            os.environ["FINETUNE_CACHE_DIR"] = old
    folder = os.path.dirname(os.path.dirname(dataset.train.paths[0]))
    return {"dataset": dataset, "folder": folder}


@pytest.fixture(scope="module")
def predictions(cli, trained_model, shapes, tmp_path_factory):
    """The same images predicted with the model named three ways: run id, models:/ URI, .keras path."""
    out = tmp_path_factory.mktemp("predictions")
    folder = shapes["folder"]
    by_run = cli("predict", f"model={trained_model['run_id']}", f"images={folder}", "predict.top_k=2",
                 "predict.batch_size=2", f"predict.output={out / 'by_run.json'}")
    assert by_run.returncode == 0, by_run.stderr[-3000:]
    by_registry = cli("predict", f"model={trained_model['registered']}", f"images={folder}",
                      f"predict.output={out / 'by_registry.csv'}")
    assert by_registry.returncode == 0, by_registry.stderr[-3000:]
    keras_file = trained_model["model_dir"] / "model.keras"
    by_path = cli("predict", f"model={keras_file}", f"images='{folder}/*/*.png'",
                  f"predict.output={out / 'by_path.csv'}")
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    payload = json.loads((out / "by_run.json").read_text())
    return {"json": payload, "registry": _read_csv(out / "by_registry.csv"),
            "path": _read_csv(out / "by_path.csv"), "stdout": by_run.stdout}


def test_predict_by_run_registry_and_path_agree(predictions, trained_model, shapes):
    payload, classes = predictions["json"], trained_model["classes"]
    assert payload["class_names"] == classes
    rows = {_real(r["path"]): r for r in payload["predictions"]}
    assert len(rows) == 3 * 8 and set(rows) == set(predictions["registry"]) == set(predictions["path"])
    for path, row in rows.items():
        assert len(row["top_k"]) == 2 and row["top_k"][0]["class"] == row["label"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        for other in (predictions["registry"][path], predictions["path"][path]):
            assert other["label"] == row["label"], path
            probs = [float(other[f"prob_{c}"]) for c in classes]
            assert np.allclose(probs, [row["probabilities"][c] for c in classes], atol=2e-6), path
    out = predictions["stdout"]
    assert "predicted" in out and "top-2" in out and "images/s" in out  # 12 batches of 2: progress lines
    assert "== finetune predict: done ==" in out and "by_run.json" in out and "predictions.csv" in out


def test_predict_matches_direct_keras_predict(predictions, trained_model):
    import keras
    from PIL import Image

    import finetune.model.preprocessing  # noqa: F401  registers BackbonePreprocess

    model = keras.saving.load_model(str(trained_model["model_dir"] / "model.keras"), safe_mode=True)
    rows = {_real(r["path"]): r for r in predictions["json"]["predictions"]}
    paths = sorted(rows)
    # the shapes images are 32x32 RGB PNGs, the model's input size: no resizing involved
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    probs = model.predict(images, batch_size=8, verbose=0)
    classes = trained_model["classes"]
    for path, p in zip(paths, probs):
        expected = np.array([rows[path]["probabilities"][c] for c in classes])
        assert np.allclose(p, expected, atol=1e-5), path
        top2 = np.sort(p)[-2:]
        if top2[1] - top2[0] > 1e-5:  # a clear winner (the tiny model is nearly uniform)
            assert classes[int(np.argmax(p))] == rows[path]["label"], path


def test_evaluate_logs_to_model_run_and_agrees_with_predict(cli, mlflow_client, trained_model, shapes,
                                                            predictions, tmp_path):
    run_id = trained_model["run_id"]
    # top-2 of 3 classes (the default k = min(5, classes) would be top-3 of 3: always 1.0)
    result = cli("evaluate", f"model={run_id}", *trained_model["overrides"], "evaluate.split=train",
                 "evaluate.top_k=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== finetune evaluate: train split ==" in result.stdout and "precision" in result.stdout
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("loss", "accuracy", "top2_accuracy", "macro_f1", *(f"{m}_{c}" for c in trained_model["classes"]
                                                                      for m in ("precision", "recall", "f1"))):
        assert f"eval_train_{name}" in metrics, name

    # consistency: predict's probabilities on the very files of the train split give evaluate's accuracy,
    # top-2 accuracy and loss
    dataset, classes = shapes["dataset"], trained_model["classes"]
    rows = {_real(r["path"]): r for r in predictions["json"]["predictions"]}
    split = [(rows[_real(p)], classes[int(y)]) for p, y in zip(dataset.train.paths, dataset.train.labels)]
    accuracy = np.mean([row["label"] == truth for row, truth in split])
    top2 = np.mean([sum(p > row["probabilities"][truth] for p in row["probabilities"].values()) < 2
                    for row, truth in split])
    loss = np.mean([-np.log(max(row["probabilities"][truth], 1e-7)) for row, truth in split])
    assert metrics["eval_train_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["eval_train_top2_accuracy"] == pytest.approx(top2, abs=1e-9)
    assert metrics["eval_train_loss"] == pytest.approx(loss, abs=1e-4)

    local = mlflow_client.download_artifacts(run_id, "evaluation/train", str(tmp_path))
    names = set(os.listdir(local))
    assert {"confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "metrics.json"} <= names
    matrix = np.loadtxt(os.path.join(local, "confusion_matrix.csv"), delimiter=",", skiprows=1)
    assert matrix.shape == (3, 3) and matrix.sum() == dataset.train.size
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["eval_train_accuracy"])


def test_evaluate_path_model_logs_new_run_and_falls_back_to_val(cli, mlflow_client, trained_model, shapes):
    keras_file = str(trained_model["model_dir"] / "model.keras")
    result = cli("evaluate", f"model={keras_file}", "data=folder", f"data.path={shapes['folder']}",
                 "evaluate.tta=flip", experiment="eval_by_path")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no test split; evaluating the validation split instead" in result.stdout
    (run,) = runs_of(mlflow_client, "eval_by_path")
    assert run.info.status == "FINISHED" and run.info.run_id != trained_model["run_id"]
    assert run.data.tags["finetune.model_ref"] == keras_file and run.data.tags["finetune.command"] == "evaluate"
    # evaluate.top_k=5 (the default) on 3 classes: top-3, named for the k it used
    assert {"eval_val_accuracy", "eval_val_loss", "eval_val_size", "eval_val_top3_accuracy"} <= set(run.data.metrics)
    assert run.data.tags["eval_val_top_k"] == "3" and "eval_val_top5_accuracy" not in run.data.metrics
    # with test-time augmentation, the metrics without it beside them
    assert run.data.tags["eval_val_tta"] == "flip" and "eval_val_accuracy_without_tta" in run.data.metrics
    assert "(without TTA:" in result.stdout
    paths = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "evaluation/val")}
    assert "evaluation/val/confusion_matrix.png" in paths


@pytest.mark.parametrize("case", ["unknown_model", "unknown_run_id", "missing_images", "other_classes"])
def test_bad_inputs_exit_2_with_one_line(cli, trained_model, shapes, tmp_path, case):
    keras_file = str(trained_model["model_dir"] / "model.keras")
    if case == "unknown_model":
        line = one_error_line(cli("predict", "model=no-such-model", f"images={shapes['folder']}"))
        assert line.startswith("error: model: received 'no-such-model'")
    elif case == "unknown_run_id":
        line = one_error_line(cli("evaluate", f"model={'0' * 32}", *trained_model["overrides"]))
        assert line.startswith("error: model: received '" + "0" * 32)
    elif case == "missing_images":
        line = one_error_line(cli("predict", f"model={keras_file}", f"images=[{tmp_path / 'nope.png'}]"))
        assert line.startswith("error: images: received") and "nope.png" in line
    else:
        line = one_error_line(cli("evaluate", f"model={keras_file}", "data=shapes", "data.num_per_class=2",
                                   "data.image_size=32", "data.classes=[circle,square,star]"))
        assert line.startswith("error: data: received") and "star" in line and "triangle" in line


# -- export ------------------------------------------------------------------------------------------

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


def _run_onnx(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(float)" and inp.shape[1:] == [32, 32, 3], (inp.type, inp.shape)
    assert isinstance(inp.shape[0], str)  # the batch dimension stays dynamic
    (probs,) = session.run(None, {inp.name: images})
    return probs


def test_float_exports_agree_and_land_in_the_models_run(cli, mlflow_client, trained_model, tmp_path):
    out = tmp_path / "exported"
    runs_before = len(runs_of(mlflow_client, "fixture_trained_model"))
    # onnx first on the command line: exported in FORMATS order all the same
    result = cli("export", f"model={trained_model['run_id']}", "export.formats=[onnx,keras,saved_model,tflite]",
                 "export.quantize=none", f"export.output={out}", "export.check_samples=16",
                 experiment="fixture_trained_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max abs diff" in result.stdout and "top-1 agree" in result.stdout

    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["check_images"] == 16
    rows = {row["format"]: row for row in report["exports"]}
    assert list(rows) == ["keras", "saved_model", "tflite", "onnx"]
    for row in rows.values():
        assert row["top1_agreement"] == 1.0 and row["decisive_disagreements"] == 0, row
        assert row["max_abs_diff"] < 1e-4, row
        assert row["size_kb"] > 100 and row["status"] == "ok"
    assert rows["tflite"]["io"] == "float32 -> float32"
    assert rows["onnx"]["io"] == "tensor(float) -> tensor(float)" and rows["onnx"]["file"] == "model.onnx"
    assert (out / "model.keras").is_file() and (out / "model.tflite").is_file() and (out / "model.onnx").is_file()
    assert (out / "saved_model" / "saved_model.pb").is_file() and (out / "label_map.json").is_file()

    # The files stand on their own: the .keras in safe mode, the TFLite in a bare interpreter, the ONNX in
    # a bare onnxruntime session (measured max abs diff to Keras: ~1e-5)
    from finetune.model.load import load_model

    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    expected = load_model(out / "model.keras").predict_on_batch(images)
    *_, probs = _run_tflite(out / "model.tflite", images)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(_run_onnx(out / "model.onnx", images), expected, atol=1e-4)

    # Logged into the training run, whose status stays FINISHED.
    run = mlflow_client.get_run(trained_model["run_id"])
    assert run.info.status == "FINISHED"
    paths = _artifacts(mlflow_client, run.info.run_id, "export")
    for name in ("model.keras", "model.tflite", "model.onnx", "export_report.json", "label_map.json",
                 "saved_model/saved_model.pb"):
        assert f"export/{name}" in paths, (name, sorted(paths))
    assert run.data.metrics["export_tflite_top1_agreement"] == 1.0
    assert run.data.metrics["export_onnx_top1_agreement"] == 1.0 and run.data.metrics["export_onnx_max_abs_diff"] < 1e-4
    assert run.data.tags["export.formats"] == "onnx,keras,saved_model,tflite"
    assert run.data.tags["export.check"] == "passed"
    assert len(runs_of(mlflow_client, "fixture_trained_model")) == runs_before  # no new run


def test_int8_tflite_runs_and_reports_agreement(cli, mlflow_client, trained_model, shapes, tmp_path):
    out = tmp_path / "int8"
    result = cli("export", f"model={trained_model['model_dir'] / 'model.keras'}", "export.formats=[tflite]",
                 "export.quantize=int8", f"export.output={out}", "export.check_samples=8",
                 "export.representative_samples=16", experiment="export_int8")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    (row,) = report["exports"]
    assert row["format"] == "tflite_int8" and row["file"] == "model_int8.tflite"
    assert row["io"] == "float32 -> float32" and report["tflite_int8_io"] == "float32"
    assert report["representative_images"] == 16 and report["check_images"] == 8
    assert row["status"] in ("ok", "warning")  # quantized exports never fail on agreement
    assert not (out / "saved_model").exists()  # the SavedModel it was converted from was temporary

    # Float I/O around integer kernels: the weights inside are int8, and it runs on raw 0..255 images.
    # On the model's 24 real images it follows the float model, which no constant output can: the float
    # model's argmax is spread over the classes, and its probabilities move across images.
    from PIL import Image

    from finetune.model.load import load_model

    paths = sorted(shapes["dataset"].train.paths + shapes["dataset"].val.paths + shapes["dataset"].test.paths)
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    expected = load_model(trained_model["model_dir"] / "model.keras").predict(images, verbose=0)
    interpreter, inp, out_detail, probs = _run_tflite(out / "model_int8.tflite", images)
    assert inp["dtype"] == np.float32 and out_detail["dtype"] == np.float32
    assert any(t["dtype"] == np.int8 for t in interpreter.get_tensor_details())
    assert probs.shape == expected.shape == (24, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=0.05)
    top1 = expected.argmax(axis=1)
    assert np.bincount(top1, minlength=3).max() <= 0.5 * len(top1)  # a constant agrees on at most half
    assert np.mean(probs.argmax(axis=1) == top1) >= 0.65  # measured: 0.83
    # per class, the int8 probabilities rise and fall with the float ones (a constant has no correlation)
    for c in range(3):
        assert np.corrcoef(probs[:, c], expected[:, c])[0, 1] >= 0.6, c  # measured: 0.81-0.92
    # int8 weights: well under half the float32 .keras file
    float_kb = (trained_model["model_dir"] / "model.keras").stat().st_size / 1024
    assert row["size_kb"] < 0.5 * float_kb

    # A model without a run (a plain path): a new run of its own, finished, holding the artifacts.
    (run,) = runs_of(mlflow_client, "export_int8")
    assert run.info.status == "FINISHED" and run.data.params["quantize"] == "int8"
    assert {"export/model_int8.tflite", "export/export_report.json"} <= _artifacts(mlflow_client, run.info.run_id)


@pytest.mark.parametrize("args, expected", [
    (["export.formats=[keras,tflight]"], "export.formats: received 'tflight'; expected each one of keras, "
                                         "saved_model, tflite, onnx (did you mean 'tflite'?)"),
    (["export.formats=[onnx]", "export.quantize=float16"],
     "export.quantize: received 'float16'; expected none unless export.formats includes tflite"),
    (["export.formats=[keras,saved_model]", "export.quantize=int8"],
     "export.quantize: received 'int8'; expected none unless export.formats includes tflite"),
    (["export.formats=[]"], "export.formats: received []; expected a non-empty list"),
])
def test_bad_options_are_one_line(cli, args, expected):
    # checked before the model is even looked up, so no model is needed
    line = one_error_line(cli("export", "model=no/such/model.keras", *args))
    assert line.startswith(f"error: {expected}"), line


def test_onnx_without_its_packages_is_one_line(warm_cli, cache_dir, tmp_path):
    """tf2onnx and onnxruntime hidden (sys.modules[name] = None: find_spec says not installed, an import
    fails): one line naming the extra, exit 2, before the model is even looked up."""
    from tests.conftest import cli_env

    script = tmp_path / "no_onnx.py"
    script.write_text("import sys\nsys.modules['tf2onnx'] = sys.modules['onnxruntime'] = None\n"
                      "import finetune.__main__ as entry\nsys.exit(entry.main(sys.argv[1:]))\n")
    process = warm_cli.start(["export", "model=no/such/model.keras", "export.formats=[keras,onnx]"], None,
                             cwd=tmp_path, env=cli_env(cache_dir), script=script)
    stdout, stderr = process.communicate(timeout=120)
    line = one_error_line(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    assert line == ("error: export.formats: onnx needs tf2onnx, onnxruntime, not installed here; "
                    "install them with: pip install 'finetune[onnx]'"), line


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
