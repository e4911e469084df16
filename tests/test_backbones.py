"""Backbone registry: all 40 keras.applications models build, split into blocks, preprocess right.

Models are built without random initialisation (see build_summary), once each: pooling
cycles over avg/max/None through the registry, and every family gets all three poolings
through its siblings or a cheap extra build. FINETUNE_FULL_BACKBONE_MATRIX=1 builds all
40 x 3 poolings instead (about a minute more).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from finetune.model import backbones
from finetune.model.backbones import BACKBONES, block_map, build_backbone, get_spec  # noqa: E402
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
    if os.environ.get("FINETUNE_FULL_BACKBONE_MATRIX") == "1":
        return [(name, p) for name in BACKBONES for p in POOLINGS if p != MAIN_POOLING[name]]
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


_BUILT: dict[tuple, dict] = {}  # build args -> summary (models are dropped: memory)


def build_summary(name, pooling, include_top=False, size=None, classes=1000, init=False):
    """Build (once per argument set), check the block map, return a small summary:
    blocks (name -> layer names), params (block -> count), input/output shapes.

    With init=False the model is built inside a StatelessScope that skips random
    initialisation: the same layers, graph and variable shapes, but 3-10x faster on CPU
    (initialising ~1.5e9 parameters dominates building all 40 models)."""
    import keras

    spec = get_spec(name)
    size = size or small_size(spec)
    key = (name, pooling, include_top, size, classes)
    if key in _BUILT:
        return _BUILT[key]
    try:
        with keras.StatelessScope(initialize_variables=init):
            model = build_backbone(spec, weights=None, input_shape=(size, size, 3),
                                   include_top=include_top, pooling=pooling, classes=classes)
        blocks = check_block_map(spec, model, pooling, include_top)
        _BUILT[key] = {
            "blocks": {block: [layer.name for layer in layers] for block, layers in blocks},
            "params": {block: sum(layer.count_params() for layer in layers)
                       for block, layers in blocks},
            "input_shape": model.input_shape, "output_shape": model.output_shape,
        }
        return _BUILT[key]
    finally:
        # Drops keras' list of never-initialised variables too: a later StatelessScope
        # (keras opens one in compute_output_spec) would otherwise initialise them all.
        keras.backend.clear_session(free_memory=False)


def test_registry_is_importable_without_tensorflow():
    code = ("import sys, finetune.model.backbones as b; b.get_spec('resnet50'); "
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
        assert spec.preprocess in {"caffe", "tf", "torch", "none"}  # each checked against Keras below
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
    with pytest.raises(ValueError, match="at least"):  # raised before any layer is built
        getattr(keras.applications, spec.constructor)(
            weights=None, include_top=False, input_shape=(spec.min_size - 1,) * 2 + (3,))
    summary = build_summary(name, MAIN_POOLING[name])
    assert summary["input_shape"] == (None, spec.min_size, spec.min_size, 3)


@pytest.mark.parametrize("name,pooling", _extra_builds())
def test_pooling_variants(name, pooling):
    build_summary(name, pooling)


def _blocks(name, pooling=None):
    """Block summary, reusing the build made by the tests above where there is one."""
    return build_summary(name, pooling)["blocks"]


def test_concrete_blocks():
    vgg = build_summary("vgg16", MAIN_POOLING["vgg16"])
    assert list(vgg["blocks"])[:6] == ["stem", "block1", "block2", "block3", "block4", "block5"]
    assert vgg["params"]["block5"] == 7_079_424  # 3 convs 512->512 3x3 with bias

    for name in ("resnet50", "resnet101", "resnet152"):
        blocks = _blocks(name, MAIN_POOLING[name])
        expected = ["stem", "conv2", "conv3", "conv4", "conv5"]
        assert list(blocks) == expected + (["top"] if MAIN_POOLING[name] else [])
        assert blocks["stem"][-1] == "pool1_pool"
    assert _blocks("resnet101", "avg")["top"] == ["avg_pool"]
    assert _blocks("resnet50_v2", MAIN_POOLING["resnet50_v2"])["conv5"][-2:] == [
        "post_bn", "post_relu"]

    inception = _blocks("inception_v3", MAIN_POOLING["inception_v3"])
    assert [b for b in inception if b != "top"] == ["stem", *(f"mixed{i}" for i in range(11))]
    assert all(inception[f"mixed{i}"][-1] == f"mixed{i}" for i in range(11))
    assert len(inception["stem"]) == 1 + 5 * 3 + 2  # input, 5 conv-bn-relu, 2 max pools

    efficientnet = _blocks("efficientnet_b0", None)
    assert list(efficientnet) == ["stem", *(f"block{i}" for i in range(1, 8)), "top"]
    assert efficientnet["top"] == ["top_conv", "top_bn", "top_activation"]
    assert efficientnet["stem"][1:3] == ["rescaling", "normalization"]

    mobilenet_v2 = _blocks("mobilenet_v2", MAIN_POOLING["mobilenet_v2"])
    assert [b for b in mobilenet_v2 if b.startswith("block_")] == [
        f"block_{i}" for i in range(17)]  # block_0 is keras' "expanded_conv"
    assert mobilenet_v2["top"][:3] == ["Conv_1", "Conv_1_bn", "out_relu"]

    xception = _blocks("xception", MAIN_POOLING["xception"])
    assert xception["block2"][-1].startswith("add") and xception["block13"][-1].startswith("add")

    convnext = _blocks("convnext_base", "max")
    assert convnext["stage1"][0].endswith("downsampling_block_0")
    assert convnext["top"][-1].startswith("layer_normalization")


def test_layer_name_suffixes_do_not_matter():
    """Auto-named layers get _N suffixes when a session builds several models."""
    import keras

    spec = get_spec("inception_v3")
    try:
        with keras.StatelessScope(initialize_variables=False):
            first, second = (build_backbone(spec, weights=None, input_shape=(75, 75, 3))
                             for _ in range(2))
            maps = [block_map(spec, model) for model in (first, second)]
    finally:
        keras.backend.clear_session(free_memory=False)
    assert first.layers[1].name != second.layers[1].name
    assert [(b, len(l)) for b, l in maps[0]] == [(b, len(l)) for b, l in maps[1]]


def test_include_top_predictions_in_top():
    """Real (initialised) builds with the classifier head."""
    summary = build_summary("mobilenet_v3_small", None, include_top=True, size=224, classes=10,
                            init=True)
    top = summary["blocks"]["top"]
    assert top[-1] == "predictions" and "conv_1" in top and "logits" in top
    assert summary["output_shape"] == (None, 10)
    vgg = build_summary("vgg16", None, include_top=True, classes=10, init=True)
    assert vgg["blocks"]["top"] == ["flatten", "fc1", "fc2", "predictions"]


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
    modes = ("caffe", "tf", "torch", "none")
    assert {spec.preprocess for spec in BACKBONES.values()} == set(modes)
    outputs = {mode: _expected(mode, x) for mode in modes}
    for spec in BACKBONES.values():
        owners = ([m for m in modules if hasattr(m, spec.constructor)]
                  or [getattr(keras.applications, spec.family)])
        assert owners, spec.constructor
        for module in owners:
            got = np.asarray(module.preprocess_input(x.copy()))
            # the one mode whose formula Keras' preprocess_input follows (the four differ by far more than 1e-3)
            (keras_mode,) = [m for m in modes if np.allclose(got, outputs[m], rtol=1e-4, atol=1e-3)]
            assert spec.preprocess == keras_mode, f"{spec.name} via {module.__name__}"


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # keras h5 io
def test_build_backbone_loads_local_weights_file(tmp_path):
    import keras
    import numpy as np

    spec = get_spec("mobilenet")
    try:
        source = build_backbone(spec, weights=None, input_shape=(32, 32, 3), pooling="avg")
        path = tmp_path / "mobilenet.weights.h5"
        source.save_weights(path)
        loaded = build_backbone(spec, weights=str(path), input_shape=(32, 32, 3), pooling="avg")
        for a, b in zip(source.weights, loaded.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    finally:
        keras.backend.clear_session(free_memory=False)
