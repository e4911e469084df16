"""Freeze policies: exact trainable weights per policy, and frozen weights that never move."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune.model.backbones import get_spec
from finetune.model.freeze import apply_freeze, format_plan
from finetune.model.assemble import assemble, build_parts

REPRESENTATIVE = ["vgg16", "resnet50", "inception_v3", "mobilenet_v2", "efficientnet_b0",
                  "convnext_tiny", "densenet121"]


def parts_for(name, size=None, classes=3, head="linear", pooling="avg"):
    spec = get_spec(name)
    side = size or max(32, spec.min_size)
    backbone_cfg = OmegaConf.create({"name": name, "weights": None, "input_shape": [side, side],
                                     "include_top": False, "pooling": pooling})
    head_cfg = OmegaConf.create({"name": head, "units": [16], "dropout": 0.1, "activation": "relu"})
    return build_parts(backbone_cfg, head_cfg, spec, classes)


def ids(weights):
    return {id(w) for w in weights}


def params(weights):
    return sum(math.prod(w.shape) for w in weights)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_trainable_weights_match_each_policy(name):
    parts = parts_for(name)
    model = assemble(parts)
    head = [w for layer in parts.head for w in layer.trainable_weights]
    # what each layer can train when it is trainable, recorded before any freezing
    capable = {id(layer): list(layer.trainable_weights) for _, layers in parts.blocks for layer in layers}
    block_names = [b for b, _ in parts.blocks]
    seen = [layer for _, layers in parts.blocks for layer in layers]
    assert len(seen) == len({id(layer) for layer in seen}) == len(parts.backbone.layers)

    def expected(trainable_blocks):
        backbone = [w for b, layers in parts.blocks if b in trainable_blocks
                    for layer in layers for w in capable[id(layer)]]
        return backbone + head

    cases = {("all", 0): set(), ("none", 0): set(block_names),
             ("last_n", 1): set(block_names[-1:]), ("last_n", 2): set(block_names[-2:])}
    for (policy, n), trainable in cases.items():
        plan = apply_freeze(parts.backbone, parts.blocks, policy, n)
        want = expected(trainable)
        assert ids(model.trainable_weights) == ids(want), (policy, n)
        assert params(model.trainable_weights) == params(want)
        assert sum(b.trainable_params for b in plan) + params(head) == params(want)
        assert sum(b.trainable_params + b.frozen_params for b in plan) == parts.backbone.count_params()
    assert "total" in format_plan(plan)


def test_vgg16_last_block_has_the_known_parameter_count():
    # block5: three 3x3 convolutions 512 -> 512 with biases
    block5 = 3 * (3 * 3 * 512 * 512 + 512)
    parts = parts_for("vgg16", pooling=None)  # no pooling: block5 is the last block
    plan = apply_freeze(parts.backbone, parts.blocks, "last_n", 1)
    assert [b.name for b in plan] == ["stem", "block1", "block2", "block3", "block4", "block5"]
    assert {b.name: b.trainable_params for b in plan if b.trainable} == {"block5": block5}
    assert sum(b.frozen_params for b in plan) == parts.backbone.count_params() - block5
    # with pooling, "top" (the pooling layer, no weights) is the last block: last_n counts it
    parts = parts_for("vgg16", pooling="avg")
    plan = apply_freeze(parts.backbone, parts.blocks, "last_n", 2)
    assert [b.name for b in plan][-2:] == ["block5", "top"]
    assert {b.name: b.trainable_params for b in plan if b.trainable} == {"block5": block5, "top": 0}


def test_batchnorm_train_policy_keeps_bn_trainable_in_frozen_blocks():
    parts = parts_for("mobilenet_v2")
    apply_freeze(parts.backbone, parts.blocks, "all", 0, batchnorm="train")
    trainable_layers = {type(w) for w in parts.backbone.trainable_weights}
    bns = [layer for _, ls in parts.blocks for layer in ls
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert params(parts.backbone.trainable_weights) == sum(params(bn.trainable_weights) for bn in bns)
    assert trainable_layers


def snapshot(model):
    return {w.path: np.array(w.numpy()) for w in model.weights}


def train_a_few_steps(model, classes=3):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, classes, 32)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("policy,n", [("all", 0), ("last_n", 2)])
def test_frozen_weights_and_bn_statistics_do_not_move(policy, n):
    parts = parts_for("mobilenet_v2")
    plan = apply_freeze(parts.backbone, parts.blocks, policy, n)
    model = assemble(parts, backbone_training=None if policy != "all" else False)
    before = snapshot(model)
    train_a_few_steps(model)
    after = snapshot(model)
    frozen_blocks = {b.name for b in plan if not b.trainable}
    moved_trainable = 0
    for block, layers in parts.blocks:
        for layer in layers:
            for w in layer.weights:
                same = np.array_equal(before[w.path], after[w.path])
                if block in frozen_blocks:
                    assert same, f"frozen {w.path} changed"
                else:
                    moved_trainable += not same
    if policy == "last_n":
        assert moved_trainable > 0  # trainable kernels and BN statistics of the last blocks moved
    for layer in parts.head:
        for w in layer.trainable_weights:
            assert not np.array_equal(before[w.path], after[w.path]), f"head {w.path} did not train"


def test_weights_from_a_file_the_project_saved(tmp_path):
    source = parts_for("mobilenet_v2")
    path = tmp_path / "backbone.weights.h5"
    source.backbone.save_weights(path)
    spec = get_spec("mobilenet_v2")
    backbone_cfg = OmegaConf.create({"name": "mobilenet_v2", "weights": str(path), "input_shape": [32, 32],
                                     "include_top": False, "pooling": "avg"})
    head_cfg = OmegaConf.create({"name": "linear", "units": [], "dropout": 0.0, "activation": "relu"})
    loaded = build_parts(backbone_cfg, head_cfg, spec, 3)
    for a, b in zip(source.backbone.weights, loaded.backbone.weights):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    apply_freeze(loaded.backbone, loaded.blocks, "all", 0)
    model = assemble(loaded, backbone_training=False)
    before = {w.path: w.numpy().copy() for w in loaded.backbone.weights}
    train_a_few_steps(model)
    for w in loaded.backbone.weights:
        assert np.array_equal(before[w.path], w.numpy()), w.path
