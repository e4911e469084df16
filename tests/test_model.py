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
