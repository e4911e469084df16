"""Assemble preprocessing + backbone + head into one functional Keras model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from finetune.model.backbones import BackboneSpec, block_map, build_backbone
from finetune.config.schema import choice
from finetune.errors import ConfigError
from finetune.model.heads import build_head
from finetune.model.preprocessing import preprocessing


@dataclass
class Parts:
    """The pieces a model is assembled from; kept so each stage can re-assemble around them."""
    spec: BackboneSpec
    input_shape: tuple[int, int, int]
    preprocess: Callable          # preprocessing(spec.preprocess): built-in Keras layers and ops
    backbone: keras.Model
    head: list
    blocks: list


def input_shape_of(cfg_backbone, spec: BackboneSpec) -> tuple[int, int, int]:
    """(h, w, 3) from backbone.input_shape, or the backbone's native size."""
    shape = cfg_backbone.input_shape
    if shape is None:
        return (spec.native_size, spec.native_size, 3)
    return (int(shape[0]), int(shape[1]), 3)


def weights_source(cfg_backbone):
    weights = cfg_backbone.weights
    return None if weights in (None, "null", "none", "None") else str(weights)


def weights_error(spec: BackboneSpec, weights, error: Exception, include_top: bool = False) -> Exception:
    if isinstance(error, ConfigError):  # already says what to do (e.g. a KerasHub preset that cannot load)
        return error
    if weights == "imagenet" and ("URL fetch failure" in str(error) or "Errno" in str(error)):
        return ConfigError(
            "backbone.weights", "imagenet",
            f"weights Keras can download; the download of {spec.name}'s ImageNet weights failed "
            f"({str(error).splitlines()[0][:160]})",
            "Offline: use backbone.weights=null (random init), backbone.weights=<local weights file>, "
            "or copy the file into ~/.keras/models/ on this machine")
    if weights not in (None, "imagenet"):
        from finetune.model.backbones import WeightsLoadError
        from finetune.model.weights_file import mismatch, read

        if isinstance(error, WeightsLoadError) and spec.family == "hub":
            return ConfigError("backbone.weights", weights,
                               f"a weights file saved from this preset with the same pooling ({spec.preset})",
                               hint=f"loading failed: {str(error).splitlines()[0][:200]}")
        if isinstance(error, WeightsLoadError):
            try:
                info = read(Path(weights).expanduser())
            except (ValueError, OSError):
                info = None
            return ConfigError("backbone.weights", weights,
                               mismatch(spec, include_top, error.model, info, error.error),
                               "Use a file saved from this backbone with the same include_top "
                               "(finetune train logs backbone/backbone.weights.h5; extract writes one too)")
        return ConfigError(
            "backbone.weights", weights,
            f"a weights file saved from {spec.name} with the same include_top/pooling/input channels "
            f"(loading failed: {type(error).__name__}: {str(error).splitlines()[0][:200]})")
    return error


def backbone_from_config(cfg_backbone, spec: BackboneSpec):
    """(the backbone the `backbone` group describes, its input shape); weight-loading failures become
    one ConfigError that says what to do."""
    shape = input_shape_of(cfg_backbone, spec)
    weights = weights_source(cfg_backbone)
    try:
        backbone = build_backbone(spec, weights=weights, input_shape=shape,
                                  include_top=bool(cfg_backbone.include_top),
                                  pooling=choice(cfg_backbone.pooling))
    except Exception as error:  # noqa: BLE001 - Keras' own messages here mislead; say what to do
        raise weights_error(spec, weights, error, bool(cfg_backbone.include_top)) from error
    return backbone, shape


def build_parts(cfg_backbone, cfg_head, spec: BackboneSpec, num_classes: int, shared_key: str | None = None,
                head_seed: int | None = None, head_layers: list | None = None) -> Parts:
    """The backbone (`shared_key`: the one kept in this process for that key, finetune.model.backbone_pool)
    and a new head (or `head_layers`, a kept one: finetune.train.head_reuse). `head_seed`: the random state
    is reset to it before the head is built, so that the head starts the same whether the backbone was
    built just now or kept."""
    if shared_key is None:
        backbone, shape = backbone_from_config(cfg_backbone, spec)
    else:
        from finetune.model import backbone_pool

        backbone, shape = backbone_pool.get_or_build(shared_key, lambda: backbone_from_config(cfg_backbone, spec))
    if head_seed is not None:
        keras.utils.set_random_seed(int(head_seed))
    return Parts(spec=spec, input_shape=shape,
                 preprocess=preprocessing(spec.preprocess, name="preprocess"),
                 backbone=backbone, head=head_layers if head_layers is not None else build_head(cfg_head, num_classes),
                 blocks=block_map(spec, backbone))


def assemble(parts: Parts, backbone_training: bool | None = None) -> keras.Model:
    """A functional model over the shared layers. `backbone_training=False` runs the whole backbone in
    inference mode (the Keras transfer-learning guide's recipe for a frozen backbone: BatchNorm and
    dropout inside it behave as at test time); None lets each layer follow the fit/predict phase."""
    inputs = keras.Input(shape=parts.input_shape, name="image")
    x = parts.preprocess(inputs)
    x = parts.backbone(x, training=backbone_training)
    for layer in parts.head:
        x = layer(x)
    return keras.Model(inputs, x, name=f"finetune_{parts.spec.name}")
