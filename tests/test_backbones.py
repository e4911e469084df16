"""Backbone registry: all 40 keras.applications models build, split into blocks, preprocess right.

Building all 40 once costs most of this file's time (~1-5 s each on CPU), so each model
is built once (pooling cycles over avg/max/None through the registry) and checked
there; every family gets all three poolings through its siblings or a cheap extra build.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from finetune import backbones  # noqa: E402  (must not import TF; checked below)
from finetune.backbones import BACKBONES, block_map, build_backbone, get_spec  # noqa: E402
from finetune.errors import ConfigError  # noqa: E402

POOLINGS = ("avg", "max", None)
MAIN_POOLING = {name: POOLINGS[i % 3] for i, name in enumerate(BACKBONES)}
# A cheap member per family; it is rebuilt with the poolings its siblings did not cover.
CHEAP = {"vgg": "vgg16", "resnet": "resnet50", "resnet_v2": "resnet50_v2",
         "inception_v3": "inception_v3", "inception_resnet_v2": None, "xception": "xception",
         "mobilenet": "mobilenet", "mobilenet_v2": "mobilenet_v2",
         "mobilenet_v3": "mobilenet_v3_small", "densenet": "densenet121",
         "nasnet": "nasnet_mobile", "efficientnet": "efficientnet_b0",
         "efficientnet_v2": "efficientnet_v2_b0", "convnext": "convnext_tiny"}


def _extra_builds():
    covered: dict[str, set] = {}
    for name, spec in BACKBONES.items():
        covered.setdefault(spec.family, set()).add(MAIN_POOLING[name])
    return [(CHEAP[family], pooling) for family, seen in covered.items() if CHEAP[family]
            for pooling in POOLINGS if pooling not in seen]


def small_size(spec) -> int:
    return max(spec.min_size, 32)


def check_block_map(spec, model, pooling, include_top):
    blocks = block_map(spec, model)
    names = [name for name, _ in blocks]
    flat = [layer for _, layers in blocks for layer in layers]
    assert len(flat) == len(model.layers)
    assert all(a is b for a, b in zip(flat, model.layers)), "layers out of model order"
    assert names[0] == "stem" and type(blocks[0][1][0]).__name__ == "InputLayer"
    assert all(layers for _, layers in blocks), "empty block kept"
    order = [spec.blocks.index(name) for name in names]  # ValueError if unknown
    assert order == sorted(order) and len(set(order)) == len(order), names
    if include_top or pooling:
        assert names[-1] == "top"
    if pooling and not include_top:
        assert "Pooling" in type(blocks[-1][1][-1]).__name__ or spec.family == "convnext"
    # A layer whose name matches a rule sits in that rule's block. NASNet's
    # topological order interleaves neighbouring cells, so a few of its layers sit
    # in the block before (never after) their own.
    misplaced = [(layer.name, name) for name, layers in blocks for layer in layers
                 if backbones._rule_block(spec, layer) not in (None, name)]
    if spec.family == "nasnet":
        for layer_name, name in misplaced:
            wanted = spec.blocks.index(backbones._rule_block(spec, model.get_layer(layer_name)))
            assert wanted == spec.blocks.index(name) + 1, (layer_name, name)
        assert len(misplaced) < 0.05 * len(model.layers)
    else:
        assert not misplaced
    return blocks


def _build_and_check(name, pooling, include_top=False, size=None, classes=1000):
    import keras

    spec = get_spec(name)
    size = size or small_size(spec)
    try:
        model = build_backbone(spec, weights=None, input_shape=(size, size, 3),
                               include_top=include_top, pooling=pooling, classes=classes)
        return [(block, [layer.name for layer in layers]) for block, layers in
                check_block_map(spec, model, pooling, include_top)], model
    finally:
        keras.backend.clear_session()
        gc.collect()


def test_registry_is_importable_without_tensorflow():
    code = ("import sys, finetune.backbones as b; b.get_spec('resnet50'); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_matches_keras_applications():
    import keras

    constructors = {n for n in dir(keras.applications) if n[:1].isupper()}
    assert len(BACKBONES) == 40
    assert {spec.constructor for spec in BACKBONES.values()} == constructors
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.blocks[0] == "stem" and spec.blocks[-1] == "top"
        assert len(set(spec.blocks)) == len(spec.blocks)
        assert spec.preprocess in {"caffe", "tf", "torch", "none"}
        assert backbones.preprocess_mode(spec) == spec.preprocess
        assert spec.min_size <= spec.native_size


def test_get_spec_unknown_suggests():
    with pytest.raises(ConfigError, match="resnet50") as info:
        get_spec("resnet5")
    assert info.value.key == "backbone" and "did you mean 'resnet50'" in str(info.value).lower()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_builds_small_and_blocks_cover_layers(name):
    """Each model builds at its minimum size (one pooling per model) and is split cleanly;
    one pixel less is refused by keras, so `min_size` is exact."""
    import keras

    spec = get_spec(name)
    with pytest.raises(ValueError):  # raised before any layer is built: cheap
        getattr(keras.applications, spec.constructor)(
            weights=None, include_top=False, input_shape=(spec.min_size - 1,) * 2 + (3,))
    blocks, model = _build_and_check(name, MAIN_POOLING[name])
    assert model.input_shape == (None, spec.min_size, spec.min_size, 3)


@pytest.mark.parametrize("name,pooling", _extra_builds())
def test_pooling_variants(name, pooling):
    _build_and_check(name, pooling)


def test_concrete_blocks():
    blocks, model = _build_and_check("vgg16", None)
    assert [b for b, _ in blocks] == ["stem", "block1", "block2", "block3", "block4", "block5"]
    params = sum(model.get_layer(n).count_params() for b, names in blocks
                 if b == "block5" for n in names)
    assert params == 7_079_424

    blocks, _ = _build_and_check("resnet50", "avg")
    assert [b for b, _ in blocks] == ["stem", "conv2", "conv3", "conv4", "conv5", "top"]
    assert dict(blocks)["stem"][-1] == "pool1_pool" and dict(blocks)["top"] == ["avg_pool"]

    blocks, _ = _build_and_check("resnet50_v2", None)
    assert dict(blocks)["conv5"][-2:] == ["post_bn", "post_relu"]

    blocks, _ = _build_and_check("inception_v3", "max")
    assert [b for b, _ in blocks] == ["stem", *(f"mixed{i}" for i in range(11)), "top"]
    mixed = dict(blocks)
    assert all(mixed[f"mixed{i}"][-1] == f"mixed{i}" for i in range(11))
    assert len(mixed["stem"]) == 1 + 5 * 3 + 2  # input, 5 conv-bn-relu, 2 max pools

    blocks, _ = _build_and_check("efficientnet_b0", None)
    assert [b for b, _ in blocks] == ["stem", *(f"block{i}" for i in range(1, 8)), "top"]
    assert dict(blocks)["top"] == ["top_conv", "top_bn", "top_activation"]
    assert dict(blocks)["stem"][1:3] == ["rescaling", "normalization"]

    blocks, _ = _build_and_check("mobilenet_v2", "avg")
    names = [b for b, _ in blocks]
    assert names == ["stem", *(f"block_{i}" for i in range(17)), "top"]

    blocks, _ = _build_and_check("xception", None)
    xception = dict(blocks)
    assert xception["block2"][-1].startswith("add") and xception["block13"][-1].startswith("add")

    blocks, _ = _build_and_check("convnext_tiny", "max")
    convnext = dict(blocks)
    assert convnext["stage1"][0].endswith("downsampling_block_0")
    assert convnext["top"][-1].startswith("layer_normalization")


def test_include_top_predictions_in_top():
    blocks, model = _build_and_check("mobilenet_v3_small", None, include_top=True,
                                     size=224, classes=10)
    top = dict(blocks)["top"]
    assert top[-1] == "predictions" and "conv_1" in top and "logits" in top
    assert model.output_shape == (None, 10)
    blocks, _ = _build_and_check("vgg16", None, include_top=True, classes=10)
    assert dict(blocks)["top"] == ["flatten", "fc1", "fc2", "predictions"]


# ------------------------------------------------------------------ preprocess modes

MEAN_CAFFE = (103.939, 116.779, 123.68)
MEAN_TORCH, STD_TORCH = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _expected(mode, x):
    import numpy as np

    if mode == "caffe":
        return x[..., ::-1] - np.array(MEAN_CAFFE)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - np.array(MEAN_TORCH)) / np.array(STD_TORCH)
    return x


def test_preprocess_modes_match_keras():
    import keras
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3))
    modules = [getattr(keras.applications, m) for m in dir(keras.applications)
               if m[:1].islower() and hasattr(getattr(keras.applications, m), "preprocess_input")]
    for spec in BACKBONES.values():
        owners = [m for m in modules if hasattr(m, spec.constructor)]
        assert owners, spec.constructor
        for module in owners:
            got = np.asarray(module.preprocess_input(x.copy()))
            np.testing.assert_allclose(got, _expected(spec.preprocess, x), rtol=1e-4, atol=1e-3,
                                       err_msg=f"{spec.name} via {module.__name__}")
