"""`finetune predict` and `finetune evaluate` end to end through the real CLI, on the session's tiny model."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from tests.conftest import one_error_line, runs_of

pytestmark = pytest.mark.slow


def _real(path) -> str:
    return os.path.realpath(str(path))


def _read_csv(path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {_real(row["path"]): row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def shapes(trained_model, cache_dir):
    """The fixture model's data: its config as the CLI composes it, the Dataset and the image folder."""
    from hydra import compose, initialize_config_dir

    from finetune.cli import conf_dir
    from finetune.config import register_configs
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

    import finetune.preprocessing  # noqa: F401  registers BackbonePreprocess

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
    result = cli("evaluate", f"model={run_id}", *trained_model["overrides"], "evaluate.split=train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== finetune evaluate: train split ==" in result.stdout and "precision" in result.stdout
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("loss", "accuracy", "top3_accuracy", "macro_f1", *(f"{m}_{c}" for c in trained_model["classes"]
                                                                      for m in ("precision", "recall", "f1"))):
        assert f"eval_train_{name}" in metrics, name
    assert metrics["eval_train_top3_accuracy"] == 1.0  # k = min(5, 3 classes)

    # consistency: predict's labels on the very files of the train split give evaluate's accuracy
    dataset, classes = shapes["dataset"], trained_model["classes"]
    rows = {_real(r["path"]): r for r in predictions["json"]["predictions"]}
    split = [(rows[_real(p)], classes[int(y)]) for p, y in zip(dataset.train.paths, dataset.train.labels)]
    accuracy = np.mean([row["label"] == truth for row, truth in split])
    loss = np.mean([-np.log(max(row["probabilities"][truth], 1e-7)) for row, truth in split])
    assert metrics["eval_train_accuracy"] == pytest.approx(accuracy, abs=1e-9)
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
                 experiment="eval_by_path")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no test split; evaluating the validation split instead" in result.stdout
    (run,) = runs_of(mlflow_client, "eval_by_path")
    assert run.info.status == "FINISHED" and run.info.run_id != trained_model["run_id"]
    assert run.data.tags["model_ref"] == keras_file and run.data.tags["finetune.command"] == "evaluate"
    assert {"eval_val_accuracy", "eval_val_loss", "eval_val_size"} <= set(run.data.metrics)
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
