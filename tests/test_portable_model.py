"""A model.keras that finetune saves loads and predicts with plain Keras where finetune cannot be imported.

One subprocess (cwd outside the repository, `import finetune` blocked by a meta-path finder placed
before the editable install's) loads every saved model in Keras safe mode, for the four preprocessing
modes, and writes back what it computed; the assertions run here, against finetune's in-process models.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import hydra
import keras
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from finetune import files
from finetune.config.paths import conf_dir
from finetune.config.schema import register_configs
from finetune.model.assemble import assemble, build_parts
from finetune.model.backbones import get_spec
from finetune.model.load import load_model
from finetune.model.preprocessing import BackbonePreprocess, preprocessing

# preprocessing mode -> (a backbone of finetune's registry with that mode, the keras.applications module
# whose preprocess_input is the reference)
CASES = {"caffe": ("vgg16", "vgg16"), "tf": ("mobilenet", "mobilenet"),
         "torch": ("densenet121", "densenet"), "none": ("efficientnet_b0", "efficientnet")}
SIZE = 32
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras h5 io

# What the next issue adds (a schedule, a loss of our own): registered in this process only, so a
# model.keras that named them in its compile config would not load in the plain process.
@keras.saving.register_keras_serializable(package="finetune_custom")
class HalvingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, initial: float):
        self.initial = initial

    def __call__(self, step):
        return self.initial * keras.ops.power(0.5, keras.ops.cast(step, "float32"))

    def get_config(self):
        return {"initial": self.initial}


@keras.saving.register_keras_serializable(package="finetune_custom")
def smoothed_crossentropy(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, 0.9 * y_pred + 0.1 / 3)


PLAIN_LOADER = r'''
import importlib.abc, json, sys

class BlockFinetune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "finetune" or name.startswith("finetune."):
            raise ImportError(f"finetune is blocked in this process: {name}")
        return None

sys.meta_path.insert(0, BlockFinetune())
try:
    import finetune  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

import keras
import numpy as np

job = json.loads(open(sys.argv[1]).read())
images = np.load(job["images"])
report = {"blocked": blocked, "cases": {}, "errors": {}}
for name, case in job["cases"].items():
    try:
        model = keras.saving.load_model(case["path"], safe_mode=True)
    except Exception as error:
        report["errors"][name] = f"{type(error).__name__}: {error}"
        continue
    inner = keras.Model(model.input, model.get_layer("preprocess").output)
    reference = getattr(keras.applications, case["module"]).preprocess_input(images.copy())
    # called eagerly: tracing predict's tf.function costs more than these few images
    np.save(case["path"] + ".predictions.npy", np.asarray(model(images, training=False)))
    np.save(case["path"] + ".preprocessed.npy", np.asarray(inner(images, training=False)))
    np.save(case["path"] + ".reference.npy", np.asarray(reference))
    report["cases"][name] = {"compiled": bool(model.compiled),
                             "layers": [type(layer).__name__ for layer in model.layers]}
report["finetune_imported"] = any(m == "finetune" or m.startswith("finetune.") for m in sys.modules)
print(json.dumps(report))
'''


def compose(*overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra.compose("train", overrides=list(overrides))


def finetune_model(backbone: str):
    """The model `finetune train` assembles, compiled (as training leaves it) with a custom schedule and
    loss."""
    cfg = compose(f"backbone={backbone}", "backbone.weights=null", f"backbone.input_shape=[{SIZE},{SIZE}]")
    model = assemble(build_parts(cfg.backbone, cfg.head, get_spec(backbone), num_classes=3))
    model.compile(optimizer=keras.optimizers.Adam(HalvingSchedule(1e-3)), loss=smoothed_crossentropy,
                  metrics=["accuracy"])
    return model


def tiny_trained_model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="dense")(inputs), name="tiny")
    model.compile(optimizer=keras.optimizers.Adam(HalvingSchedule(1e-2)), loss=smoothed_crossentropy)
    model.fit(np.ones((4, 4), np.float32), np.array([0, 1, 2, 0]), verbose=0)
    return model


def run_plain(tmp_path, cases: dict, images: np.ndarray) -> dict:
    np.save(tmp_path / "images.npy", images)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"images": str(tmp_path / "images.npy"), "cases": cases}))
    script = tmp_path / "plain_load.py"
    script.write_text(PLAIN_LOADER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, str(script), str(job)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_model_loads_and_predicts_without_finetune(tmp_path):
    images = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype("float32")
    cases, expected = {}, {}
    try:
        for mode, (backbone, module) in CASES.items():
            model = finetune_model(backbone)
            assert get_spec(backbone).preprocess == mode
            path = files.save_model(model, tmp_path / mode / "model.keras")
            expected[mode] = keras.ops.convert_to_numpy(model(images, training=False))
            cases[mode] = {"path": str(path), "module": module}
        # a model compiled with them, saved by Keras' own model.save, keeps its compile config
        tiny_trained_model().save(tmp_path / "with_compile_state.keras")
        cases["with_compile_state"] = {"path": str(tmp_path / "with_compile_state.keras"), "module": "vgg16"}
    finally:
        keras.backend.clear_session(free_memory=False)

    report = run_plain(tmp_path, cases, images)
    assert report["blocked"] and not report["finetune_imported"]
    # plain Keras cannot load a compile config that names our schedule or loss...
    assert "finetune_custom" in report["errors"].pop("with_compile_state")
    # ...and what finetune saves does not carry one
    assert report["errors"] == {}
    for mode in CASES:
        folder = tmp_path / mode
        assert not report["cases"][mode]["compiled"]
        assert "BackbonePreprocess" not in report["cases"][mode]["layers"]
        preprocessed = np.load(folder / "model.keras.preprocessed.npy")
        reference = np.load(folder / "model.keras.reference.npy")
        np.testing.assert_allclose(preprocessed, reference, rtol=0, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(np.load(folder / "model.keras.predictions.npy"), expected[mode],
                                   rtol=1e-5, atol=1e-6, err_msg=mode)
        config = json.loads(zipfile.ZipFile(folder / "model.keras").read("config.json"))
        assert not config.get("compile_config")


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "none"])
def test_model_saved_with_the_old_preprocess_layer_still_loads_in_finetune(tmp_path, mode):
    """Models saved before the built-in preprocessing hold BackbonePreprocess (and their compile state)."""
    images = np.random.default_rng(2).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    inputs = keras.Input((8, 8, 3), name="image")
    x = BackbonePreprocess(mode, name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    old = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="classifier")(x))
    old.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    old.optimizer.build(old.trainable_variables)
    old.save(tmp_path / "old.keras")  # as the old save path did: compile state included
    loaded = load_model(tmp_path / "old.keras")
    assert isinstance(loaded.get_layer("preprocess"), BackbonePreprocess)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), old.predict(images, verbose=0), rtol=1e-6)
    # old and new preprocessing compute the same thing, so old and new models agree
    np.testing.assert_allclose(keras.ops.convert_to_numpy(preprocessing(mode)(images)),
                               keras.ops.convert_to_numpy(BackbonePreprocess(mode)(images)), rtol=1e-6, atol=1e-5)


def test_save_model_drops_training_state_only(tmp_path):
    """files.save_model keeps every weight and the architecture, not the optimizer or compile config."""
    model = tiny_trained_model()
    files.save_model(model, tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["class_name"] == "Functional" and config["config"]["name"] == "tiny"
    assert not config.get("compile_config") and "finetune_custom" not in json.dumps(config)
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert not loaded.compiled
    np.testing.assert_array_equal(loaded.get_layer("dense").get_weights()[0], model.get_layer("dense").get_weights()[0])
    # the model that was saved is unchanged: still compiled, still trains
    assert model.compiled and model.optimizer.iterations.numpy() == 1
