"""`finetune classify`, `finetune extract` and `finetune train data=features`, through the real CLI."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import runs_of

pytestmark = pytest.mark.slow


def write_images(root, classes=("cat", "dog"), per_class=6, size=32):
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 200 + c * 50
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def test_classify_prints_and_writes_top_k(cli, mlflow_client, tmp_path):
    images = write_images(tmp_path / "photos", per_class=2)
    index = tmp_path / "index.json"
    index.write_text(json.dumps({str(i): [f"n{i:08d}", f"thing_{i}"] for i in range(1000)}))
    out = tmp_path / "top.csv"
    result = cli("classify", "backbone=mobilenet_v2", "backbone.weights=null", f"images={images}",
                 f"classify.class_index={index}", "classify.top_k=4", f"classify.output={out}",
                 experiment="e2e_classify")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 * 4  # 4 images x top-4
    by_image = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    assert len(by_image) == 4
    for ranked in by_image.values():
        probs = [float(r["probability"]) for r in ranked]
        assert [int(r["rank"]) for r in ranked] == [1, 2, 3, 4]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(r["name"] == f"thing_{int(r['class'])}" for r in ranked)
    assert "thing_" in result.stdout
    (run,) = runs_of(mlflow_client, "e2e_classify")
    assert run.info.status == "FINISHED"


def test_classify_without_class_index_offline_says_how(cli, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(image)
    result = cli("classify", "backbone=mobilenet_v2", "backbone.weights=null", f"images=[{image}]",
                 env={"KERAS_HOME": str(tmp_path / "keras_home")}, experiment="e2e_classify_offline")
    assert result.returncode == 2
    line = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "classify.class_index" in line[0] and "Offline" in line[0]


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    import keras

    path = tmp_path_factory.mktemp("weights") / "mnv2.weights.h5"
    keras.utils.set_random_seed(3)
    keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg",
                                   input_shape=(32, 32, 3)).save_weights(path)
    return path


def direct_features(weights, files):
    import keras

    model = keras.applications.MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3))
    model.load_weights(weights)
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype="float32") for f in files])
    return model.predict(keras.applications.mobilenet_v2.preprocess_input(x), verbose=0)


@pytest.fixture(scope="module")
def extracted(cli, tmp_path_factory, backbone_file):
    """extracted(fmt) -> (CompletedProcess, output folder) of one `finetune extract` per format, run once
    (the npz one is also what test_train_on_features_then_reassembled_model_agrees trains on)."""
    done = {}

    def extract(fmt: str):
        if fmt not in done:
            tmp = tmp_path_factory.mktemp(f"extract_{fmt}")
            data, out = write_images(tmp / "data"), tmp / "features"
            done[fmt] = cli("extract", "backbone=mobilenet_v2", f"backbone.weights={backbone_file}",
                            "backbone.input_shape=[32,32]", "data=folder", f"data.path={data}", "data.val_split=0.34",
                            f"extract.format={fmt}", f"extract.output={out}", experiment=f"e2e_extract_{fmt}"), out
        return done[fmt]

    return extract


@pytest.mark.parametrize("fmt", ["npz", "parquet"])
def test_extract_matches_keras_predict(mlflow_client, extracted, backbone_file, fmt):
    result, out = extracted(fmt)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout
    from finetune.features.extract import read_features

    got = read_features(out)
    assert got["features"].shape == (12, 1280)
    assert set(got["splits"]) == {"train", "val"}
    want = direct_features(backbone_file, got["paths"])
    np.testing.assert_allclose(got["features"], want, rtol=1e-5, atol=1e-5)
    labels = [0 if "/cat/" in p else 1 for p in got["paths"]]
    assert list(got["labels"]) == labels
    manifest = got["manifest"]
    assert manifest["backbone"] == "mobilenet_v2" and manifest["feature_dim"] == 1280
    assert manifest["weights_sha256"] and manifest["class_names"] == ["cat", "dog"]
    if fmt == "npz":
        with np.load(out / "features.npz", allow_pickle=False) as npz:  # no pickled objects inside
            assert set(npz.files) == {"features", "labels", "paths", "splits"}
    (run,) = runs_of(mlflow_client, f"e2e_extract_{fmt}")
    assert run.info.status == "FINISHED"


def test_train_on_features_then_reassembled_model_agrees(cli, mlflow_client, tmp_path, extracted):
    result, out = extracted("npz")
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli("train", "data=features", f"data.path={out}", "trainer.epochs=3", "trainer.verbose=0",
                 experiment="e2e_features")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(r for r in runs_of(mlflow_client, "e2e_features") if "feature_file" in r.data.params)
    assert run.info.status == "FINISHED"
    local = mlflow_client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl"))
    from finetune.features.extract import read_features
    from finetune.model.load import load_model

    model = load_model(f"{local}/model.keras")
    feats = read_features(out)
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype="float32") for p in feats["paths"]])
    full = model.predict(images, verbose=0)
    head = model.get_layer("head").predict(feats["features"], verbose=0)
    np.testing.assert_allclose(full, head, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "dl" / "model" / "label_map.json").read_text())["class_names"] == ["cat", "dog"]
