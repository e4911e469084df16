"""KerasHub backbones (`backbone=hub backbone.preset=<preset name | local preset folder>`).

A hub backbone is wrapped into the same shape as a `keras.applications` one: a functional model from raw
images (already resized by the data pipeline) to features, so training, the feature cache, `extract` and
export treat both alike:

    image -> Rescaling(the preset's image converter: scale, offset) -> the KerasHub backbone -> pooling

- **Preprocessing.** The preset's `ImageConverter` says how pixels are scaled (`scale`, `offset`, per
  channel or not). Its resizing is the data pipeline's job here, so only the scaling goes into the model,
  as a built-in `Rescaling` layer named `hub_image_converter` (no weights). A preset without a converter
  gets 0..1 pixels and a printed line saying so.
- **Pooling.** Feature maps (ResNet, CSPNet, EfficientNet, MobileNet, DenseNet, VGG) pool with
  `backbone.pooling=avg|max`; token sequences (ViT, DINOv2, DeiT) with `avg` (mean over tokens) or `token`
  (the class token: built-in `Cropping1D` + `Flatten`, so no custom layer). `null` keeps the backbone's
  output as it is (for `head=flatten_mlp`).
- **Loading.** A saved model holds KerasHub's backbone class: loading it needs `keras-hub` installed (Keras
  imports it by itself), never finetune.
- **Block map** (`block_map`): read from the backbone's structure. Layers are grouped by the numbered
  stage their name starts with (`stack0_*`, `stage2_*`, `block3a_*`, `transition1_*`, ...). A layer that
  holds the repeated blocks itself, as ViT's `vit_encoder` (`transformer_block_1..N`) and DINOv2's `encoder`
  (`layers_0..N-1`) do, is opened one level down, when its sub-layers hold all of its weights. Everything
  before the first numbered group (image input, converter, patch embedding, stem) is "stem"; everything
  after the last (final norm, top convolution, pooling) is "top".

Nothing here imports TensorFlow, Keras or keras-hub at module level: `hub_spec` reads the preset's JSON
files only, so configs are checked before TensorFlow starts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.errors import ConfigError

NAME = "hub"                 # backbone.name of the hub group
WEIGHTS = "preset"           # backbone.weights=preset: the preset's own weights
INSTALL = "pip install 'finetune[hub]' (keras-hub; Python >= 3.11)"
DEFAULT_SIZE = 224
_GROUP = re.compile(r"(?:^|_)(stack|stage|block|transition|layers|transformer_block)_?(\d+)(?=[a-z]?(?:_|$))")
_OFFLINE_HINT = ("Offline: save a preset on a machine that can download it "
                 "(keras_hub.models.Backbone.from_preset(name).save_to_preset(folder), and the same for "
                 "keras_hub.layers.ImageConverter), copy the folder here and set backbone.preset=<folder>")


def is_local(preset: str) -> bool:
    """A folder on this machine (else a name KerasHub resolves: a built-in preset, kaggle://, hf://)."""
    text = str(preset)
    return not re.match(r"^[a-z]+://", text) and (Path(text).expanduser().exists() or "/" in text
                                                   or text.startswith((".", "~")))


def read_preset(preset: str) -> tuple[dict, dict | None]:
    """(backbone config.json, image_converter.json or None) of a local preset folder; ConfigError if it is
    not one."""
    folder = Path(str(preset)).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        raise ConfigError("backbone.preset", str(preset),
                          "a KerasHub preset name or a preset folder holding config.json "
                          "(what keras_hub's save_to_preset writes)")
    try:
        backbone = json.loads(config.read_text())
        converter_file = folder / "image_converter.json"
        converter = json.loads(converter_file.read_text()) if converter_file.is_file() else None
    except (OSError, ValueError) as error:
        raise ConfigError("backbone.preset", str(preset), f"a readable preset folder ({error})") from None
    if not isinstance(backbone, dict) or "class_name" not in backbone:
        raise ConfigError("backbone.preset", str(preset), "a preset folder whose config.json names a backbone class")
    return backbone, converter


def fixed_size(backbone_config: dict) -> tuple[int, int] | None:
    """(height, width) when the preset's backbone is built for one image size (ViT), else None."""
    config = backbone_config.get("config") or {}
    shape = config.get("image_shape")
    if "position_embedding_shape" in config:  # DINOv2 interpolates its position embeddings to any size
        return None
    if shape and shape[0] and shape[1]:
        return int(shape[0]), int(shape[1])
    return None


def slug(preset: str) -> str:
    base = Path(str(preset).rstrip("/")).name or str(preset)
    return re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "preset"


def hub_spec(cfg_backbone) -> dict:
    """The BackboneSpec fields of `backbone=hub` (finetune.model.backbones.spec_for makes the spec): read from
    a local preset's JSON, or generic for a named preset. `blocks` is empty: the block map exists once the
    backbone is built (see train's check)."""
    preset = getattr(cfg_backbone, "preset", None)
    if not preset or str(preset) in ("???", "None", "null"):
        raise ConfigError("backbone.preset", preset, "a KerasHub preset name (e.g. resnet_18_imagenet) or a "
                                                     "local preset folder, with backbone=hub")
    preset = str(preset)
    constructor, native, size_required = "Backbone", DEFAULT_SIZE, False
    if is_local(preset):
        backbone, converter = read_preset(preset)
        constructor = str(backbone["class_name"])
        fixed = fixed_size(backbone)
        image_size = ((converter or {}).get("config") or {}).get("image_size")
        if fixed:
            native, size_required = fixed[0], True
        elif image_size and image_size[0]:
            native = int(image_size[0])
    return dict(name=f"hub_{slug(preset)}", constructor=constructor, family="hub", preprocess="none",
                native_size=native, min_size=32, blocks=(), native_size_required_for_weights=size_required,
                preset=preset)


def import_keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        raise ConfigError("backbone", NAME, f"keras-hub installed: {INSTALL}",
                          hint=f"importing it failed: {error}") from None
    return keras_hub


def _load(keras_hub, preset: str, load_weights: bool, input_shape):
    import keras

    overrides = {}
    if is_local(preset):
        if "image_shape" in (read_preset(preset)[0].get("config") or {}):
            overrides["image_shape"] = tuple(input_shape)
        preset = str(Path(preset).expanduser())
    try:
        backbone = keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights, **overrides)
    except Exception as error:  # noqa: BLE001 - KerasHub's download and lookup errors vary; one line each
        text = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
        if is_local(preset):
            raise ConfigError("backbone.preset", preset, "a preset folder KerasHub can load", hint=text) from None
        raise ConfigError("backbone.preset", preset, "a KerasHub preset this machine can load "
                                                     f"(loading failed: {text})", hint=_OFFLINE_HINT) from None
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception:  # noqa: BLE001 - a preset without an image converter
        converter = None
    if not isinstance(backbone, keras.Model):
        raise ConfigError("backbone.preset", preset, "an image backbone preset")
    return backbone, converter


def converter_layer(converter, name: str = "hub_image_converter"):
    """The converter's pixel scaling as a built-in Rescaling layer (x * scale + offset)."""
    import keras

    scale = getattr(converter, "scale", None) if converter is not None else None
    offset = getattr(converter, "offset", None) if converter is not None else None
    if converter is None:
        print("   the preset has no image converter: the backbone gets pixels scaled to 0..1", flush=True)
        scale = 1.0 / 255.0
    plain = (lambda v, default: default if v is None else (list(map(float, v)) if hasattr(v, "__len__") else float(v)))
    return keras.layers.Rescaling(plain(scale, 1.0), offset=plain(offset, 0.0), name=name)


def _pooling_layers(rank: int, pooling, preset: str, tokens: int | None):
    import keras

    if pooling is None:
        return []
    if rank == 4:
        if pooling == "token":
            raise ConfigError("backbone.pooling", "token", "avg, max or null: this preset's backbone gives feature "
                                                           f"maps, not tokens ({preset})")
        return [keras.layers.GlobalAveragePooling2D(name="avg_pool") if pooling == "avg"
                else keras.layers.GlobalMaxPooling2D(name="max_pool")]
    if rank == 3:
        if pooling == "token":
            return [keras.layers.Cropping1D((0, tokens - 1), name="class_token"),
                    keras.layers.Flatten(name="token_pool")]
        return [keras.layers.GlobalAveragePooling1D(name="avg_pool") if pooling == "avg"
                else keras.layers.GlobalMaxPooling1D(name="max_pool")]
    raise ConfigError("backbone.preset", preset, "an image backbone whose output is feature maps or tokens "
                                                 f"(this one gives rank {rank})")


def build_hub_backbone(spec, *, weights, input_shape, pooling):
    """The wrapped KerasHub backbone (see the module docstring). `weights`: "preset" or None (random init from
    the preset's config; a weights file is loaded into it by finetune.model.backbones.build_backbone)."""
    import keras

    keras_hub = import_keras_hub()
    backbone, converter = _load(keras_hub, spec.preset, weights == WEIGHTS, input_shape)
    inputs = keras.Input(shape=tuple(input_shape), name="image_input")
    x = backbone(converter_layer(converter)(inputs))
    for layer in _pooling_layers(len(x.shape), pooling, spec.preset, x.shape[1] if len(x.shape) == 3 else None):
        x = layer(x)
    return keras.Model(inputs, x, name=spec.name)


def inner_backbone(model):
    """The KerasHub backbone inside a wrapper built by `build_hub_backbone` (None for other models)."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    has_converter = any(layer.name == "hub_image_converter" for layer in model.layers)
    return nested[0] if len(nested) == 1 and has_converter else None


def _units(backbone) -> list:
    """The backbone's layers, with a layer that holds the repeated blocks (and nothing else) opened."""
    units = []
    for layer in backbone.layers:
        subs = list(getattr(layer, "_layers", []) or [])
        inner = {id(v) for s in subs for v in s.weights}
        opened = (sum(1 for s in subs if _GROUP.search(s.name)) >= 2
                  and {id(v) for v in layer.weights} == inner)
        units.extend(subs if opened else [layer])
    return units


def _key(layer) -> str | None:
    match = _GROUP.search(layer.name)
    return f"{match.group(1)}{match.group(2)}" if match else None


def block_map(model) -> list[tuple[str, list]]:
    """Ordered (block name, layers) of a wrapper from `build_hub_backbone`: stem, the numbered groups, top."""
    backbone = inner_backbone(model)
    outer = list(model.layers)
    at = outer.index(backbone)
    units = _units(backbone)
    keys = [_key(unit) for unit in units]
    first = next((i for i, k in enumerate(keys) if k), len(units))
    last = max((i for i, k in enumerate(keys) if k), default=-1)
    blocks: list[tuple[str, list]] = [("stem", outer[:at] + units[:first])]
    for unit, key in zip(units[first:last + 1], keys[first:last + 1]):
        if key and key not in (name for name, _ in blocks):
            blocks.append((key, []))
        blocks[-1][1].append(unit)
    blocks.append(("top", units[last + 1:] + outer[at + 1:]))
    return [(name, layers) for name, layers in blocks if layers]


def inner_layer_model(model, layer: str):
    """image -> converter -> the hub backbone up to its layer `layer` (for `extract.layer`), or None."""
    import keras

    backbone = inner_backbone(model)
    if backbone is None or layer not in [item.name for item in backbone.layers]:
        return None
    sub = keras.Model(backbone.inputs, backbone.get_layer(layer).output, name=f"{backbone.name}_{layer}")
    inputs = keras.Input(shape=model.input_shape[1:], name="image_input")
    return keras.Model(inputs, sub(model.get_layer("hub_image_converter")(inputs)), name=f"{model.name}_{layer}")
