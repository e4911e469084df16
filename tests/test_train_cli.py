"""`finetune train` end to end through the real CLI (subprocesses), checked in the MLflow store."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, TINY_SHAPES, artifact_paths, assert_recorded, one_error_line, runs_of

pytestmark = pytest.mark.slow

def test_two_stage_shapes_run_records_params_metrics_artifacts(cli, mlflow_client, store):
    # the two_stage preset (head, then the last blocks at 10x lower lr) on VGG16, whose second stage's blocks
    # trace in seconds (MobileNetV2's backward pass took ~20 s here)
    result = cli("train", *TINY, "backbone=vgg16", *TINY_SHAPES, "experiment=two_stage", "trainer.stages.0.epochs=1",
                 "trainer.stages.1.epochs=2", "tracking.register_model=tiny-shapes", experiment="e2e_shapes")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "freeze plan" in result.stdout and "run id" in result.stdout and "mlflow ui" in result.stdout
    (run,) = runs_of(mlflow_client, "e2e_shapes")
    assert_recorded(mlflow_client, run, epochs=3, classes=["circle", "square", "triangle"])
    assert run.data.params["weights_source"] == "random"
    paths = artifact_paths(mlflow_client, run.info.run_id)
    assert {"model/config.yaml", "model/label_map.json", "backbone/backbone.weights.h5"} <= paths
    version = mlflow_client.get_model_version("tiny-shapes", "1")
    assert version.run_id == run.info.run_id and "models:/tiny-shapes/1" in result.stdout
    for name in ("circle", "square", "triangle"):
        assert f"test_f1_{name}" in run.data.metrics

    # both stages, one history
    assert result.stdout.count("freeze plan, stage") == 2
    client = mlflow_client
    stages = [m.value for m in client.get_metric_history(run.info.run_id, "stage")]
    assert stages == [0.0, 1.0, 1.0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1, 2]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-4)  # recompiled at 10x lower
    params = run.data.params
    assert params["stage1.freeze"] == "all" and params["stage2.freeze"] == "last_n"
    assert int(params["stage2.params_trainable"]) > int(params["stage1.params_trainable"])

    # the logged model loads in plain Keras safe mode and carries its own preprocessing (built-in layers)
    import keras

    local = mlflow_client.download_artifacts(run.info.run_id, "model", str(store / "download"))
    model = keras.saving.load_model(f"{local}/model.keras", safe_mode=True)
    probs = model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    labels = json.loads((store / "download" / "model" / "label_map.json").read_text())
    assert labels["class_names"] == ["circle", "square", "triangle"]


def write_folder(root, classes=("cat", "dog", "fox"), per_class=6):
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            pixels[..., c] = 255
            image = Image.fromarray(pixels).convert(modes[i % 4])
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg' if image.mode in ('RGB', 'L') else 'png'}")
    return root


def test_tfds_run_on_mock_data(mlflow_client, store, cache_dir, tmp_path):
    """The real CLI entry point, with tensorflow-datasets' mock_data standing in for the download."""
    script = textwrap.dedent("""
        import sys
        import tensorflow_datasets as tfds
        from finetune.cli import main
        from finetune.data import tfds as tfds_source
        # mock_data replaces the download; the reachability pre-check must see "online" too
        tfds_source.network_reachable = lambda *args, **kwargs: True
        with tfds.testing.mock_data(num_examples=24):
            sys.exit(main(sys.argv[1:]))
    """)
    import os
    import subprocess

    args = ["train", *TINY, "data=tfds", "data.name=mnist", "data.train_split=train",
            "data.val_split=test", "data.test_split=null", "tracking.experiment=e2e_tfds"]
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(cache_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=store, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_tfds")
    assert_recorded(mlflow_client, run, epochs=1, classes=[str(i) for i in range(10)])


def test_seed_preset_runs_one_tiny_step(cli, mlflow_client):
    result = cli("train", "experiment=seed_vgg16_flatten", "backbone.input_shape=[32,32,3]", "backbone.weights=null",
                 *TINY_SHAPES, "trainer.steps_per_epoch=1", "trainer.epochs=1", "trainer.verbose=0",
                 experiment="e2e_preset_seed_vgg16_flatten")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_preset_seed_vgg16_flatten")
    assert run.info.status == "FINISHED"


def test_quickstart_preset_on_its_digits_records_everything(cli, mlflow_client):
    """The README's main command, one training step of it, on its own data (scikit-learn's digits): its data,
    freeze and trainer choices on VGG16 (MobileNetV2 trained whole traces for ~45 s here, and the session's
    trained_model fixture already trains it that way, BatchNorm re-estimation too)."""
    result = cli("train", "experiment=quickstart", "backbone=vgg16", "backbone.input_shape=[32,32]",
                 "trainer.bn_recalibration_batches=2", "trainer.steps_per_epoch=1", "trainer.epochs=1",
                 "trainer.verbose=0", "data.val_split=0.1", "data.test_split=0.1",  # ~180 images each to evaluate
                 experiment="e2e_preset_quickstart")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_preset_quickstart")
    assert_recorded(mlflow_client, run, epochs=1, classes=[str(i) for i in range(10)])
    params = run.data.params
    assert params["dataset"].startswith("digits") and params["freeze.name"] == "none"
    assert int(params["train_size"]) + int(params["val_size"]) + int(params["test_size"]) == 1797
    assert "top5_accuracy" in run.data.metrics  # 10 classes > 5


def test_help_cfg_and_module_entry(cli, mlflow_client):
    top = cli("--help")
    assert top.returncode == 0 and "train" in top.stdout
    help_ = cli("train", "--help")
    assert help_.returncode == 0
    for group in ("backbone", "freeze", "head", "data", "optimizer", "experiment"):
        assert f"{group}:" in help_.stdout, group
    cfg = cli("train", "--cfg", "job", "backbone=resnet50", "freeze=last_n", "freeze.n=2", "head=mlp")
    assert cfg.returncode == 0, cfg.stderr
    assert "name: resnet50" in cfg.stdout and "name: last_n" in cfg.stdout
    assert mlflow_client.get_experiment_by_name("finetune") is None  # --cfg ran nothing


def test_bad_configs_exit_2_with_one_line_and_no_run(cli, mlflow_client, tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "only" / "a.png")
    write_folder(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "ghost").mkdir()
    cases = [
        (["backbone=resnet5"], "backbone"),
        (["trainer.epoch=3"], "trainer.epoch"),
        (["backbone=vgg16", "freeze=last_n", "freeze.n=99"], "freeze.n"),
        (["backbone=inception_v3", "backbone.input_shape=[64,64]"], "backbone.input_shape"),
        (["data=folder", f"data.path={tmp_path / 'missing'}"], "data.path"),
        (["data=folder", f"data.path={tmp_path / 'one'}"], "data.path"),
        (["data=folder", f"data.path={tmp_path / 'empty_class'}"], "ghost"),
    ]
    for overrides, needle in cases:
        result = cli("train", *overrides, experiment="e2e_bad")
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (overrides, lines)
    exp = mlflow_client.get_experiment_by_name("e2e_bad")
    assert exp is None or not mlflow_client.search_runs([exp.experiment_id])


def test_failure_inside_a_run_marks_it_failed(cli, mlflow_client, tmp_path):
    """A weights file of the same layers with other shapes (MobileNetV2 at another width): the checks
    before the run cannot tell, Keras' load into the built backbone fails: one line, a FAILED run."""
    import keras

    other = tmp_path / "mnv2_alpha035.weights.h5"
    keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35,
                                   pooling="avg").save_weights(other)
    result = cli("train", *TINY, *TINY_SHAPES, f"backbone.weights={other}", experiment="e2e_failed")
    line = one_error_line(result)
    assert "backbone.weights" in line and "mobilenet_v2 include_top=false" in line and "other shapes" in line
    (run,) = runs_of(mlflow_client, "e2e_failed")
    assert run.info.status == "FAILED"
    assert "backbone.weights" in run.data.tags["error"]


def test_help_and_cfg_job_never_import_tensorflow(tmp_path):
    """--help and --cfg job answer in well under 2 s here because TensorFlow is not imported."""
    code = ("import sys; from finetune.cli import main; main(sys.argv[1:]); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
    for args in (["train", "--help"], ["train", "--cfg", "job"], ["train", "--help", "trainer.epoch=3"]):
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True)
        assert "tensorflow was imported" not in done.stderr, args
        assert done.returncode in (0, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_dry_run_shows_the_seed_model_and_creates_no_run(cli, tmp_path):
    """trainer.dry_run=true on the seed's VGG16 300x300 Flatten model: summary, freeze plan, the parameter
    counts (57,193,290 in all), data per split and class, the feature cache state and an epoch estimate;
    no MLflow store or run appears."""
    result = cli("train", "experiment=seed_vgg16_flatten", "backbone.weights=null", "trainer.dry_run=true",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "parameters: 57,193,290 total, 42,478,602 trainable, 14,714,688 frozen" in out
    assert "freeze plan, stage 1 of 1" in out and "block5  frozen" in out and "Total params: 57,193,290" in out
    assert "train   1,259 images: 0 124, 1 128" in out
    assert "feature cache: train miss" in out and "estimated time per epoch:" in out
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.rglob("model.keras"))
