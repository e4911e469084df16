"""The assembled model: the seed's example by hand vs from config; preprocessing vs Keras'."""
from __future__ import annotations

import hydra
import keras
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from finetune.model.backbones import BACKBONES, get_spec
from finetune.config.paths import conf_dir
from finetune.config.schema import register_configs
from finetune.model.assemble import assemble, build_parts
from finetune.model.preprocessing import preprocessing


def compose(*overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra.compose("train", overrides=list(overrides))


def test_seed_vgg16_flatten_equals_the_hand_written_model():
    cfg = compose("experiment=seed_vgg16_flatten", "backbone.weights=null")
    parts = build_parts(cfg.backbone, cfg.head, get_spec(cfg.backbone.name), num_classes=10)
    ours = assemble(parts)
    hand = keras.Sequential([
        keras.Input(shape=(300, 300, 3)),
        keras.applications.VGG16(include_top=False, weights=None, input_shape=(300, 300, 3)),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    assert ours.count_params() == hand.count_params() == 57_193_290
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in hand.weights]
    # the preprocessing (caffe: a channel flip op + a Rescaling layer) adds layers but no weights
    kinds = [type(layer).__name__ for layer in ours.layers]
    assert kinds == ["InputLayer", "Rescaling", "Functional", "Flatten", "Dense", "Dense"]
    assert ours.output_shape == (None, 10)


MODULE_OF = {"vgg": "vgg16", "resnet": "resnet", "resnet_v2": "resnet_v2", "inception_v3": "inception_v3",
             "inception_resnet_v2": "inception_resnet_v2", "xception": "xception",
             "mobilenet": "mobilenet", "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3",
             "densenet": "densenet", "nasnet": "nasnet", "efficientnet": "efficientnet",
             "efficientnet_v2": "efficientnet_v2", "convnext": "convnext"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_preprocessing_matches_keras_preprocess_input(name):
    spec = get_spec(name)
    module = getattr(keras.applications, MODULE_OF[spec.family])
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    want = module.preprocess_input(images.copy())
    got = keras.ops.convert_to_numpy(preprocessing(spec.preprocess)(images))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_deferred_model_assembles_into_the_model_it_trained(tmp_path, policy):
    """A sweep job that trains a head alone writes its head and its backbone's weights, not model.keras
    (finetune.model.deferred); loading it assembles a model.keras that predicts what the job's model did,
    in the precision the job built it in (finetune picks mixed_bfloat16 for VGG16 on some CPUs)."""
    import json

    from omegaconf import OmegaConf

    from finetune import files
    from finetune.model import deferred
    from finetune.model.load import resolve_model
    from finetune.train.cached_features import head_on_features

    cfg = compose("backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "head=mlp")
    keras.config.set_dtype_policy(policy)
    parts = build_parts(cfg.backbone, cfg.head, get_spec("vgg16"), num_classes=3, head_seed=0)
    parts.backbone.trainable = False
    trained = assemble(parts, backbone_training=False)
    head = head_on_features(parts.head, parts.backbone.output_shape[1:])
    rng = np.random.default_rng(0)
    for weight in head.weights:  # not the initial weights: what a trained head holds
        weight.assign(rng.normal(0, 0.05, weight.shape).astype(weight.dtype))
    files.save_weights(parts.backbone, tmp_path / "backbone.weights.h5")
    folder = deferred.write(tmp_path / "model", head, tmp_path / "backbone.weights.h5")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / "label_map.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "input_shape": [32, 32, 3]}))
    assert deferred.is_deferred(folder) and (folder / "head.keras").stat().st_size < 2_000_000
    keras.config.set_dtype_policy("float32")  # what a later process loads it in

    bundle = resolve_model(str(folder), None, tmp_path / "downloads")
    assert bundle.model_path == folder / "model.keras" and not deferred.is_deferred(folder)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expected = trained.predict(images, verbose=0)
    assert expected.std(axis=0).max() > 1e-3, "the images should not all get the same prediction"
    assembled = bundle.load()
    def policies(model):  # the backbone's layers' (its input layer holds no weights and computes nothing)
        return {layer.dtype_policy.name for layer in model.layers[2].layers
                if not isinstance(layer, keras.layers.InputLayer)}

    assert policies(assembled) == policies(trained) and policy in policies(trained)
    np.testing.assert_allclose(assembled.predict(images, verbose=0), expected, atol=1e-5)
