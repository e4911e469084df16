"""Registry of the 40 `keras.applications` backbones, and how to split each into blocks.

Nothing here imports TensorFlow or Keras at module level: config validation reads
`BACKBONES` / `get_spec` before TF is imported. Keras is imported inside the
functions that need a model.

Blocks
------
Every spec lists its ordered block names (`spec.blocks`, first "stem", last "top").
`block_map(spec, model)` splits `model.layers` into contiguous runs, one per block,
in model order; each layer lands in exactly one block and empty blocks are dropped
(e.g. "top" when `include_top=False, pooling=None`).

Layers are matched by name against the spec's rules (ordered `(regex, block)` pairs,
first match wins; `block` may use `\\1` for a captured group). Keras also creates
layers with automatic names (`add_3`, `conv2d_17`, `activation_5`, ...), and its
topological layer order interleaves branches, so assignment is end-anchored:

* a block ends at its last matched layer, extended over the unmatched layers after it
  up to the next graph "cut" (a point where a single tensor connects everything
  before to everything after: e.g. Xception's residual `add`), and over every
  following cut-to-cut segment that has no matched layer at all (InceptionV3's
  unnamed stem convolutions, NASNet's final ReLU, ConvNeXt's pooled LayerNorm);
* any other unmatched layer belongs to the next block (InceptionV3's unnamed branch
  convolutions belong to the `mixedN` concatenation that closes them);
* the InputLayer is always in "stem".

Choices where the keras graph has no obvious owner:

* "top" holds pooling, the classifier head, and the final feature convolution where
  keras names it as a head layer (EfficientNet/EfficientNetV2 `top_*`, MobileNetV2
  `Conv_1`/`out_relu`, MobileNetV3 `conv_1`, InceptionResNetV2 `conv_7b`).
  Pure normalisation epilogues stay with the last stage: ResNetV2 `post_bn`/`post_relu`
  are in "conv5", DenseNet's final `bn`/`relu` are in "dense4".
* VGG's and Xception's "stem" is only the InputLayer (their first convolutions are
  named `block1_*`).
* DenseNet transitions (`poolN_*`) are their own blocks: transition1..transition3.
* ConvNeXt downsampling layers belong to the stage they start (stage1..stage3).
* InceptionResNetV2 groups its repeated modules: block35 (x10), block17 (x20),
  block8 (x10).
* NASNet: "stem" holds the stem convolution and both stem reduction cells; normal
  cells are grouped by stage (normal1..normal3) between the two reduction cells.
  Its topological order interleaves neighbouring cells (a cell's `adjust_*` layers
  appear before the previous cell finishes); those few layers go to the earlier block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from finetune.errors import ConfigError, did_you_mean

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")

# Pooling layers keras adds for `pooling=` / `include_top=True`; what follows them is
# head (flatten, fc, dropout, reshape, predictions) and is picked up by extension.
_POOLING = r"^(avg_pool|max_pool|global_(average|max)_pooling2d(_\d+)?)$"
_HEAD = ((_POOLING, "top"), (r"^(flatten(_\d+)?|fc1|fc2|predictions)$", "top"))


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    constructor: str
    family: str
    preprocess: str
    native_size: int
    min_size: int
    blocks: tuple[str, ...]
    native_size_required_for_weights: bool = False
    weight_sizes: tuple[int, ...] | None = None
    rules: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    preset: str | None = None  # backbone=hub: the KerasHub preset (finetune.model.hub)


# ---------------------------------------------------------------- block rules per family


def _seq(prefix: str, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(first, last + 1))


def _vgg():
    return ("stem", *_seq("block", 1, 5), "top"), ((r"^block(\d)_", r"block\1"),)


def _resnet(v2: bool):
    rules = [(r"^(conv1|pool1)_", "stem"), (r"^conv([2-5])_", r"conv\1")]
    if v2:
        rules.append((r"^post_(bn|relu)$", "conv5"))
    return ("stem", *_seq("conv", 2, 5), "top"), tuple(rules)


def _densenet():
    blocks = ("stem", "dense1", "transition1", "dense2", "transition2",
              "dense3", "transition3", "dense4", "top")
    rules = [(r"^(conv1_|pool1$)", "stem")]
    for i in range(1, 5):
        rules.append((rf"^conv{i + 1}_", f"dense{i}"))
        if i < 4:
            rules.append((rf"^pool{i + 1}_", f"transition{i}"))
    rules.append((r"^(bn|relu)$", "dense4"))
    return blocks, tuple(rules)


def _inception_v3():
    return ("stem", *_seq("mixed", 0, 10), "top"), ((r"^mixed(\d+)$", r"mixed\1"),)


def _inception_resnet_v2():
    blocks = ("stem", "mixed_5b", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "top")
    rules = ((r"^(mixed_5b|mixed_6a|mixed_7a)$", r"\1"),
             (r"^(block35|block17|block8)_", r"\1"),
             (r"^conv_7b", "top"))
    return blocks, rules


def _xception():
    return ("stem", *_seq("block", 1, 14), "top"), ((r"^block(\d+)_", r"block\1"),)


def _mobilenet():
    rules = ((r"^conv1(_|$)", "stem"),
             (r"^conv_(dw|pw|pad)_(\d+)", r"block\2"),
             (r"^conv_preds$", "top"))
    return ("stem", *_seq("block", 1, 13), "top"), rules


def _mobilenet_v2():
    rules = ((r"^(Conv1|bn_Conv1)", "stem"),
             (r"^expanded_conv_", "block_0"),
             (r"^block_(\d+)_", r"block_\1"),
             (r"^(Conv_1|out_relu)", "top"))
    return ("stem", *_seq("block_", 0, 16), "top"), rules


def _mobilenet_v3(last: int):
    rules = ((r"^conv(_bn)?$", "stem"),
             (r"^expanded_conv_(\d+)_", r"block\1"),
             (r"^expanded_conv_", "block0"),
             (r"^(conv_1|conv_1_bn|conv_2|logits)$", "top"))
    return ("stem", *_seq("block", 0, last), "top"), rules


def _efficientnet(stages: int):
    rules = ((r"^stem_", "stem"), (r"^block(\d)[^_]+_", r"block\1"), (r"^top_", "top"))
    return ("stem", *_seq("block", 1, stages), "top"), rules


def _convnext():
    rules = [(r"_(prestem_normalization|stem)$", "stem"),
             (r"^convnext_\w+?_stage_(\d)_", r"stage\1"),
             (r"_head_", "top")]
    rules += [(rf"_downsampling_block_{i}$", f"stage{i + 1}") for i in range(3)]
    return ("stem", *_seq("stage", 0, 3), "top"), tuple(rules)


def _nasnet(num_blocks: int):
    n = num_blocks
    blocks = ("stem", "normal1", "reduction1", "normal2", "reduction2", "normal3", "top")
    cell = r"^(normal|adjust|separable_conv)_\w*_({ids})$"

    def ids(first: int) -> str:
        return "|".join(str(i) for i in range(first, first + n))

    rules = ((r"^stem_|_stem_[12]$", "stem"),
             (rf"_reduce_{n}$", "reduction1"),
             (rf"_reduce_{2 * n}$", "reduction2"),
             (cell.format(ids=ids(0)), "normal1"),
             (cell.format(ids=ids(n + 1)), "normal2"),
             (cell.format(ids=ids(2 * n + 1)), "normal3"))
    return blocks, rules


# ---------------------------------------------------------------- the registry

_EFFICIENTNET_SIZES = (224, 240, 260, 300, 380, 456, 528, 600)

# name, constructor, family, preprocess, native_size, min_size, (blocks, rules), extras
_TABLE = [
    ("vgg16", "VGG16", "vgg", "caffe", 224, 32, _vgg(), {}),
    ("vgg19", "VGG19", "vgg", "caffe", 224, 32, _vgg(), {}),
    *[(f"resnet{d}", f"ResNet{d}", "resnet", "caffe", 224, 32, _resnet(False), {})
      for d in (50, 101, 152)],
    *[(f"resnet{d}_v2", f"ResNet{d}V2", "resnet_v2", "tf", 224, 32, _resnet(True), {})
      for d in (50, 101, 152)],
    ("inception_v3", "InceptionV3", "inception_v3", "tf", 299, 75, _inception_v3(), {}),
    ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", "tf", 299, 75,
     _inception_resnet_v2(), {}),
    ("xception", "Xception", "xception", "tf", 299, 71, _xception(), {}),
    ("mobilenet", "MobileNet", "mobilenet", "tf", 224, 32, _mobilenet(),
     {"weight_sizes": (128, 160, 192, 224)}),
    ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf", 224, 32, _mobilenet_v2(),
     {"weight_sizes": (96, 128, 160, 192, 224)}),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", "none", 224, 32,
     _mobilenet_v3(10), {}),
    ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", "none", 224, 32,
     _mobilenet_v3(14), {}),
    *[(f"densenet{d}", f"DenseNet{d}", "densenet", "torch", 224, 32, _densenet(), {})
      for d in (121, 169, 201)],
    # Keras 3.15 NASNet accepts imagenet weights at any static size with include_top=False
    # (weight shapes do not depend on the input size); it refuses None in input_shape.
    ("nasnet_mobile", "NASNetMobile", "nasnet", "tf", 224, 32, _nasnet(4), {}),
    ("nasnet_large", "NASNetLarge", "nasnet", "tf", 331, 32, _nasnet(6), {}),
    *[(f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", "none", size, 32,
       _efficientnet(7), {}) for i, size in enumerate(_EFFICIENTNET_SIZES)],
    *[(f"efficientnet_v2_{v.lower()}", f"EfficientNetV2{v}", "efficientnet_v2", "none", size,
       32, _efficientnet(stages), {})
      for v, size, stages in (("B0", 224, 6), ("B1", 240, 6), ("B2", 260, 6), ("B3", 300, 6),
                              ("S", 384, 6), ("M", 480, 7), ("L", 480, 7))],
    *[(f"convnext_{v}", f"ConvNeXt{v.title().replace('Xl', 'XL')}", "convnext", "none", 224,
       32, _convnext(), {}) for v in ("tiny", "small", "base", "large", "xlarge")],
]


def _make(name, constructor, family, preprocess, native, minimum, blocks_rules, extras):
    blocks, rules = blocks_rules
    return BackboneSpec(name=name, constructor=constructor, family=family,
                        preprocess=preprocess, native_size=native, min_size=minimum,
                        blocks=blocks, rules=rules + _HEAD, **extras)


BACKBONES: dict[str, BackboneSpec] = {row[0]: _make(*row) for row in _TABLE}


def get_spec(name: str) -> BackboneSpec:
    """The spec registered as `name`; ConfigError (with a suggestion) otherwise."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        options = sorted(BACKBONES)
        suggestion = did_you_mean(name, options).strip().strip("()")
        hint = suggestion[:1].upper() + suggestion[1:] if suggestion else ""
        raise ConfigError("backbone", name, "one of " + ", ".join(options), hint=hint) from None


def spec_for(cfg_backbone) -> BackboneSpec:
    """The spec of a `backbone` group: a registered keras.applications backbone, or a KerasHub preset
    (`backbone=hub`, read by finetune.model.hub without importing TensorFlow)."""
    from finetune.model import hub

    if cfg_backbone.name == hub.NAME:
        return BackboneSpec(**hub.hub_spec(cfg_backbone))
    return get_spec(cfg_backbone.name)


def preprocess_mode(spec: BackboneSpec) -> str:
    """The `mode` of the model's keras `preprocess_input` ("none": model rescales inside)."""
    return spec.preprocess


def build_backbone(spec: BackboneSpec, *, weights, input_shape, include_top=False,
                   pooling=None, classes=1000):
    """Instantiate `keras.applications.<spec.constructor>`.

    `weights`: None, "imagenet", or a path to a local weights file (.weights.h5 / .h5),
    which is loaded after building with random weights.
    """
    import keras

    is_path = weights not in (None, "imagenet", "preset")
    if spec.family == "hub":
        from finetune.model.hub import build_hub_backbone

        model = build_hub_backbone(spec, weights=None if is_path else weights, input_shape=input_shape,
                                   pooling=pooling)
    else:
        constructor = getattr(keras.applications, spec.constructor)
        model = constructor(weights=None if is_path else weights,
                            input_shape=tuple(input_shape) if input_shape is not None else None,
                            include_top=include_top, pooling=pooling, classes=classes)
    if is_path:
        try:
            model.load_weights(str(weights))
        except Exception as error:  # noqa: BLE001 - kept with the model, to say how the two differ
            raise WeightsLoadError(model, error) from error
    return model


class WeightsLoadError(Exception):
    """A local weights file Keras could not load into the freshly built `model`."""

    def __init__(self, model, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.model, self.error = model, error


# ---------------------------------------------------------------- block map


def _rule_block(spec: BackboneSpec, layer) -> str | None:
    if type(layer).__name__ == "InputLayer":
        return "stem"
    for pattern, block in spec.rules:
        match = re.search(pattern, layer.name)
        if match:
            return match.expand(block)
    return None


def _layer_parents(model) -> dict[int, set[int]]:
    """id(layer) -> ids of the layers feeding it in this model (through non-layer ops)."""
    nodes = [n for depth in getattr(model, "_nodes_by_depth", {}).values() for n in depth]
    parents = {id(n.operation): {id(p.operation) for p in n.parent_nodes} for n in nodes}
    layer_ids = {id(layer) for layer in model.layers}

    def resolve(op_id, seen):
        for parent in parents.get(op_id, ()):
            if parent in layer_ids:
                yield parent
            elif parent not in seen:
                seen.add(parent)
                yield from resolve(parent, seen)

    return {lid: set(resolve(lid, set())) for lid in layer_ids}


def _cuts(model) -> list[bool]:
    """cut[i]: every graph edge leaving layers[:i+1] leaves from layers[i].

    Without graph information every position counts as a cut."""
    layers = model.layers
    position = {id(layer): i for i, layer in enumerate(layers)}
    try:
        parents = _layer_parents(model)
    except Exception:  # private Keras graph API changed: fall back to name order only
        return [True] * len(layers)
    last_use = list(range(len(layers)))
    for j, layer in enumerate(layers):
        for parent in parents.get(id(layer), ()):
            i = position[parent]
            last_use[i] = max(last_use[i], j)
    cuts, reach = [], -1
    for i in range(len(layers)):
        cuts.append(reach <= i)
        reach = max(reach, last_use[i])
    return cuts


def _block_ends(assigned: list[int | None], cuts: list[bool]) -> dict[int, int]:
    """Block index -> position of its last layer (before making them monotone)."""
    n = len(assigned)
    last = {b: i for i, b in enumerate(assigned) if b is not None}
    segment_has_match, current = [False] * n, False  # per position: its segment has a match
    start = 0
    for i in range(n):
        current = current or assigned[i] is not None
        if cuts[i] or i == n - 1:
            segment_has_match[start:i + 1] = [current] * (i + 1 - start)
            start, current = i + 1, False
    ends = {}
    for block, end in last.items():
        while end + 1 < n and assigned[end + 1] is None and (
                not cuts[end] or not segment_has_match[end + 1]):
            end += 1
        ends[block] = end
    return ends


def block_map(spec: BackboneSpec, model) -> list[tuple[str, list]]:
    """Ordered (block_name, layers) covering every layer of `model.layers` exactly once (a KerasHub
    backbone: its own layers, see finetune.model.hub.block_map)."""
    if spec.family == "hub":
        from finetune.model.hub import block_map as hub_block_map

        return hub_block_map(model)
    layers = model.layers
    index = {name: i for i, name in enumerate(spec.blocks)}
    assigned = []
    for layer in layers:
        block = _rule_block(spec, layer)
        if block is not None and block not in index:
            raise ValueError(f"{spec.name}: rule produced unknown block {block!r} "
                             f"for layer {layer.name!r}")
        assigned.append(None if block is None else index[block])
    ends = _block_ends(assigned, _cuts(model))
    bounds, reach = [], -1  # (block index, last position), monotone in block order
    for block in sorted(ends):
        if ends[block] > reach:
            reach = ends[block]
            bounds.append((block, reach))
    if bounds:
        bounds[-1] = (bounds[-1][0], len(layers) - 1)
    result, start = [], 0
    for block, end in bounds:
        result.append((spec.blocks[block], list(layers[start:end + 1])))
        start = end + 1
    return result
