"""KerasHub backbones (`backbone=hub`): tiny presets built from config with random weights and saved to folders
(scripts/hub_preset.py), then block maps, preprocessing, pooling, the config checks, and train / gradual
unfreezing / export / extract / train-on-features / a plain-Keras load through the real CLI."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.errors import ConfigError
from tests.conftest import REPO, artifact_paths, cli_env, one_error_line, printed_model_file, runs_of
from tests.test_config import compose

keras_hub = pytest.importorskip("keras_hub", reason="the [hub] extra (keras-hub) is not installed")

SHAPES = ["data=shapes", "data.num_per_class=8", "data.image_size=32", "data.classes=[circle,square,triangle]"]
HUB = ["backbone=hub", "backbone.input_shape=[32,32]", "trainer.batch_size=16", "trainer.verbose=0"]
# family -> the block map read from the tiny preset of scripts/hub_preset.py
BLOCKS = {
    "resnet_tiny": ["stem", "stack0", "stack1", "top"],
    "vit": ["stem", "transformer_block1", "transformer_block2", "top"],
    "dinov2": ["stem", "layers0", "layers1", "top"],
    "cspnet": ["stem", "stage0", "stage1", "top"],
    "densenet": ["stem", "stack1", "transition1", "stack2", "top"],
    "efficientnet": ["stem", "block1", "block2", "top"],
    "mobilenet": ["stem", "block0", "block1", "block2", "block3", "top"],
}


def _script():
    spec = importlib.util.spec_from_file_location("hub_preset", REPO / "scripts" / "hub_preset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub_presets")
    script = _script()
    for family in [*BLOCKS, "resnet"]:
        script.write_preset(family, folder / family)
    return folder


def _built(presets, family, pooling="avg", weights="preset"):
    from finetune.model.backbones import block_map, build_backbone, spec_for

    spec = spec_for(compose("backbone=hub", f"backbone.preset={presets / family}").backbone)
    model = build_backbone(spec, weights=weights, input_shape=(32, 32, 3), pooling=pooling)
    return spec, model, block_map(spec, model)


@pytest.mark.parametrize("family", sorted(BLOCKS))
def test_block_map_is_read_from_the_structure_and_covers_every_weight_once(presets, family):
    spec, model, blocks = _built(presets, family, pooling="token" if family in ("vit", "dinov2") else "avg")
    assert [name for name, _ in blocks] == BLOCKS[family]
    ids = [id(v) for _, layers in blocks for layer in layers for v in layer.weights]
    assert len(ids) == len(set(ids)) == len(model.weights)
    assert spec.family == "hub" and spec.name == f"hub_{family}"


def test_freeze_policies_train_the_blocks_they_name(presets):
    from finetune.model.freeze import apply_freeze

    _, model, blocks = _built(presets, "resnet_tiny")
    counts = {}
    for policy, n in (("all", 0), ("last_n", 2), ("none", 0)):
        plan = apply_freeze(model, blocks, policy, n)
        counts[policy] = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        assert counts[policy] == sum(b.trainable_params for b in plan)
    stack1 = sum(int(np.prod(v.shape)) for layer in dict(blocks)["stack1"] for v in layer.trainable_weights)
    assert counts["all"] == 0 and counts["last_n"] == stack1 > 0  # top (pooling) has no weights
    assert counts["none"] == sum(int(np.prod(v.shape)) for v in model.trainable_weights) > stack1


def test_preprocessing_is_the_presets_image_converter_as_a_builtin_layer(presets):
    """resnet: per-channel ImageNet scaling; the Rescaling layer gives what KerasHub's converter gives."""
    _, model, _ = _built(presets, "resnet")
    layer = model.get_layer("hub_image_converter")
    assert type(layer).__name__ == "Rescaling" and not layer.weights
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    converter = keras_hub.layers.ImageConverter.from_preset(str(presets / "resnet"))
    np.testing.assert_allclose(np.asarray(layer(images)), np.asarray(converter(images)), rtol=1e-5, atol=1e-4)


def test_token_pooling_is_the_class_token(presets):
    import keras

    _, model, _ = _built(presets, "vit", pooling="token")
    inner = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    tokens = inner(model.get_layer("hub_image_converter")(images))
    np.testing.assert_allclose(np.asarray(model(images)), np.asarray(tokens)[:, 0], atol=1e-6)
    _, averaged, _ = _built(presets, "vit", pooling="avg")
    assert averaged.output.shape == (None, 16)


@pytest.mark.parametrize("overrides,key", [
    (["backbone=hub"], "backbone.preset"),
    (["backbone=hub", "backbone.preset=/no/such/folder"], "backbone.preset"),
    (["backbone=hub", "backbone.preset=PRESET/resnet_tiny", "backbone.weights=imagenet"], "backbone.weights"),
    (["backbone=hub", "backbone.preset=PRESET/vit", "backbone.input_shape=[64,64]"], "backbone.input_shape"),
    (["backbone=vgg16", "backbone.pooling=token"], "backbone.pooling"),
])
def test_config_errors_name_the_key_before_tensorflow(presets, overrides, key):
    from finetune.app.checks import validate_train

    overrides = [o.replace("PRESET", str(presets)) for o in overrides]
    with pytest.raises(ConfigError) as info:
        validate_train(compose(*overrides))
    assert info.value.key == key and "\n" not in str(info.value)


@pytest.mark.slow
def test_named_preset_offline_is_one_line_with_the_way_out(cli):
    result = cli("train", *HUB, *SHAPES, "backbone.preset=resnet_18_imagenet", "trainer.epochs=1",
                 env={"KAGGLE_HUB_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}, experiment="hub_offline")
    line = one_error_line(result)
    assert line.startswith("error: backbone.preset: received 'resnet_18_imagenet'") and "save_to_preset" in line


@pytest.mark.slow
def test_train_gradual_export_and_load_with_plain_keras(cli, mlflow_client, presets, tmp_path):
    """ResNet preset through the CLI: gradual unfreezing over its block map (head, then stack1, then stack0),
    export checked against Keras, and model.keras loaded and run in a process that never imports finetune."""
    result = cli("train", *HUB, *SHAPES, f"backbone.preset={presets / 'resnet_tiny'}", "trainer.epochs=3",
                 "freeze=gradual", "freeze.every=1", "trainer.feature_cache=off", experiment="hub_gradual")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "hub_gradual")
    _, model, blocks = _built(presets, "resnet_tiny")
    size = {name: sum(int(np.prod(v.shape)) for layer in layers for v in layer.trainable_weights)
            for name, layers in blocks}
    head = int(run.data.params["stage1.params_trainable"])
    per_epoch = [m.value for m in sorted(mlflow_client.get_metric_history(run.info.run_id, "params_trainable"),
                                         key=lambda m: m.step)]
    assert per_epoch == [head, head + size["stack1"], head + size["stack1"] + size["stack0"]]
    assert run.data.params["backbone.preset"] == str(presets / "resnet_tiny")
    model_path = printed_model_file(result.stdout)

    exported = cli("export", f"model={model_path}", "export.formats=[keras,tflite]", "export.check_samples=8",
                   experiment="hub_gradual")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.count(" ok") >= 2, exported.stdout

    images = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x.npy", images)
    code = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1]);"
            "p = m.predict(np.load(sys.argv[2]), verbose=0); np.save(sys.argv[3], p);"
            "print('finetune' in sys.modules, 'keras_hub' in sys.modules)")
    plain = subprocess.run([sys.executable, "-c", code, model_path, str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                           cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout.split()[-2:] == ["False", "True"]  # Keras imports keras_hub by itself
    probabilities = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_extract_class_tokens_then_train_on_them(cli, mlflow_client, presets, tmp_path):
    """ViT preset: extract the class token of each image (the feature file and manifest), train a head on
    it, and get back one image model (backbone rebuilt from the preset + the head)."""
    out = tmp_path / "features"
    result = cli("extract", *HUB[:2], f"backbone.preset={presets / 'vit'}", "backbone.pooling=token",
                 *SHAPES, f"extract.output={out}", experiment="hub_extract")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["feature_dim"] == 16 and manifest["preset"] == str(presets / "vit")
    assert manifest["weights"] == "preset"
    trained = cli("train", "data=features", f"data.path={out}", "trainer.epochs=1", "trainer.verbose=0",
                  experiment="hub_features")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "hub_features")
    assert "model/model.keras" in artifact_paths(mlflow_client, run.info.run_id)
    assert "reassembled hub_vit" in trained.stdout


def test_onnx_ops_tf2onnx_leaves_unconverted_are_found(tmp_path):
    """tf2onnx 1.17 writes a ViT's exact GELU as a TensorFlow `Erfc` node that onnxruntime cannot load;
    export then fails with one line (finetune.model.export.write_onnx) instead of onnxruntime's traceback."""
    onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
    from onnx import TensorProto, helper

    from finetune.model.export import unconverted_ops

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Erfc", ["x"], ["e"]), helper.make_node("Relu", ["e"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    onnx.save(model, tmp_path / "m.onnx")
    assert unconverted_ops(tmp_path / "m.onnx") == ["Erfc"]
