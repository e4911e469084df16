"""What a local `backbone.weights` file holds, read with h5py / zipfile (no TensorFlow), and the one-line
message when it cannot be the configured backbone's weights.

Keras' own messages for a wrong file mislead ("You are trying to load a weight file containing 16 layers
into a model with 13 layers", "Layer count mismatch ... Model expected 104 layers", or 13 objects that
"could not be loaded"), and Keras 3 silently loads a with-classifier file into a backbone without one.
Three formats are read:
  - Keras 3 `.weights.h5` (`model.save_weights`): groups `layers/<auto name>/vars/<i>`; the names are
    Keras' automatic ones (conv2d_3, dense_1), so the file tells layer kinds, counts and shapes;
  - legacy Keras 2 `.h5` (the files keras.applications downloads): the real layer names in
    `layer_names` / `weight_names` attributes (at the root, or under `model_weights`);
  - `.keras` archives: config.json (real layer names and classes) beside model.weights.h5.
"""
from __future__ import annotations

import functools
import json
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import ConfigError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
# The classifier layers keras.applications adds with include_top=True (MobileNet v1: conv_preds;
# MobileNetV3: logits; VGG: fc1, fc2; everything: predictions).
TOP_LAYERS = {"predictions", "fc1", "fc2", "conv_preds", "logits"}
WEIGHTED_CLASSES = {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense", "BatchNormalization",
                    "LayerNormalization", "Conv2DTranspose"}


@dataclass
class WeightsFile:
    path: Path
    format: str                                          # "keras3" | "legacy" | "keras"
    kinds: Counter = field(default_factory=Counter)      # layer kind -> count of layers with weights
    names: list[str] | None = None                       # real layer names (legacy / .keras)
    has_top: bool = False

    @property
    def layers(self) -> int:
        return sum(self.kinds.values())

    def summary(self) -> str:
        if self.names:
            detail = ", ".join(self.names[:2]) + (f", ..., {self.names[-1]}" if len(self.names) > 2 else "")
        else:
            detail = ", ".join(f"{n} {k}" for k, n in self.kinds.most_common(4))
            detail += ", ..." if len(self.kinds) > 4 else ""
        top = "with" if self.has_top else "without"
        return f"{self.layers} layers with weights ({detail}), {top} a classifier"


def _kind(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def sniff(path: Path) -> str:
    """'hdf5', 'zip', 'text' or 'binary' from the first bytes."""
    head = path.read_bytes()[:512] if path.stat().st_size < 512 else path.open("rb").read(512)
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary"


def read(path: Path) -> WeightsFile:
    """What `path` holds; ValueError with a short description when it is no Keras weights file."""
    kind = sniff(path)
    if kind == "zip":
        return _read_keras(path)
    if kind != "hdf5":
        what = {"text": "a text file", "binary": "a binary file that is neither HDF5 nor a .keras archive"}[kind]
        raise ValueError(f"it is {what}, not Keras weights")
    import h5py

    with h5py.File(path, "r") as handle:
        return _read_h5(path, handle)


def _read_h5(path: Path, handle) -> WeightsFile:
    group = handle["model_weights"] if "model_weights" in handle else handle
    if "layer_names" in group.attrs:  # legacy Keras 2 format, real layer names
        names, kinds = [], Counter()
        for raw in group.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            if name in group and len(group[name].attrs.get("weight_names", [])):
                names.append(name)
                kinds["layer"] += 1
        info = WeightsFile(path, "legacy", kinds, names, has_top=bool(TOP_LAYERS & set(names)))
    elif "layers" in handle:  # Keras 3: layers/<auto name>/vars/<i>, nested for sub-models
        kinds, dense = Counter(), 0

        def visit(name, obj):
            nonlocal dense
            parts = name.split("/")
            if len(parts) >= 2 and parts[-1] == "vars" and len(obj.keys()):
                layer = parts[-2]
                kinds[_kind(layer)] += 1
                dense += _kind(layer) == "dense"

        handle.visititems(visit)
        info = WeightsFile(path, "keras3", kinds, None, has_top=dense > 0)
    else:
        raise ValueError("it is an HDF5 file without Keras layer weights (no 'layers' group, no 'layer_names')")
    if not info.layers:
        raise ValueError("it is an HDF5 file holding no layer weights")
    return info


def _read_keras(path: Path) -> WeightsFile:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"config.json", "model.weights.h5"} <= names:
                raise ValueError("it is a zip archive but not a .keras model (no config.json / model.weights.h5)")
            config = json.loads(archive.read("config.json"))
    except zipfile.BadZipFile as error:
        raise ValueError(f"it is a damaged zip archive ({error})") from None
    layers = _config_layers(config)
    weighted = [(layer["config"]["name"], layer["class_name"]) for layer in layers
                if layer.get("class_name") in WEIGHTED_CLASSES and "name" in layer.get("config", {})]
    kinds = Counter(_class_kind(cls) for _, cls in weighted)
    names = [name for name, _ in weighted]
    return WeightsFile(path, "keras", kinds, names, has_top=bool(TOP_LAYERS & set(names)))


def _config_layers(config) -> list[dict]:
    """Every layer config of a (possibly nested) functional model config."""
    found = []
    for layer in config.get("config", {}).get("layers", []) or []:
        found.append(layer)
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            found.extend(_config_layers(layer))
    return found


def check(key: str, value, spec, include_top: bool) -> WeightsFile:
    """The file's description, or a ConfigError that says what the file is and what to do."""
    path = Path(str(value)).expanduser()
    try:
        info = read(path)
    except (ValueError, OSError) as error:
        raise ConfigError(key, str(value), f"a Keras weights file (.weights.h5 / .h5 / .keras) for "
                                           f"{spec.name}, but {error}") from None
    want = f"{spec.name} include_top={str(include_top).lower()}"
    # ConvNeXt blocks hold Dense layers: its Keras 3 files cannot show a classifier by layer kind
    top_known = not (info.format == "keras3" and spec.family == "convnext")
    if top_known and info.has_top and not include_top:
        raise ConfigError(key, str(value), f"weights of {want}, but the file looks like a backbone WITH its "
                                           f"classifier (include_top=true; {info.summary()})",
                          "Use the no-top file (Keras names it ..._notop.h5) or set backbone.include_top=true "
                          "where the command allows it")
    if top_known and include_top and not info.has_top and info.names is not None:
        raise ConfigError(key, str(value), f"weights of {want}, but the file looks like a backbone WITHOUT a "
                                           f"classifier (include_top=false; {info.summary()})",
                          "Set backbone.include_top=false or use the file with the classifier")
    if info.format == "keras3":
        skeleton = skeleton_kinds(spec, include_top)
        if skeleton != info.kinds:
            raise ConfigError(key, str(value), f"weights of {want} ({_kinds_text(skeleton)}), but the file holds "
                                               f"{info.summary()}: saved from another architecture or depth",
                              "Use a file saved from this backbone with the same include_top (finetune train "
                              "logs backbone/backbone.weights.h5; extract writes one too)")
    if info.names:
        others = other_architectures(info.names, spec)
        if others is not None:
            looks = f"looks like {' or '.join(others)}" if others else "matches no registered backbone"
            raise ConfigError(key, str(value), f"weights of {want}, but the file {looks} ({info.summary()})")
    return info


def other_architectures(names: list[str], spec) -> list[str] | None:
    """None when the layer names fit `spec`; else the registered backbones (by constructor) they fit."""
    from finetune.model.backbones import BACKBONES

    def fits(candidate) -> float:
        body = [n for n in names if n not in TOP_LAYERS]
        rules = [re.compile(pattern) for pattern, _ in candidate.rules]
        return sum(any(r.search(n) for r in rules) for n in body) / max(len(body), 1)

    if fits(spec) >= 0.9:
        return None
    matches = sorted({c.constructor for c in BACKBONES.values() if c.family != spec.family and fits(c) >= 0.9})
    return matches[:4]


@functools.lru_cache(maxsize=8)  # the CLI's precheck and the command check the same file in one process
def skeleton_kinds(spec, include_top: bool) -> Counter:
    """Layer kind -> count of layers with weights of the backbone, from a random-weights build at its
    smallest input size (the layers and their kinds do not depend on the size). Imports Keras: called
    only for a Keras 3 weights file, whose automatic layer names tell nothing else; a few seconds,
    instead of failing after the data is loaded."""
    import keras

    from finetune.model.backbones import build_backbone

    size = max(spec.min_size, 32)
    model = build_backbone(spec, weights=None, input_shape=(size, size, 3), include_top=include_top)
    kinds = Counter(_class_kind(type(layer).__name__) for layer in model.layers if layer.weights)
    del model
    keras.backend.clear_session()
    return Counter(kinds)


def _kinds_text(kinds: Counter) -> str:
    top = ", ".join(f"{n} {k}" for k, n in kinds.most_common(4))
    return f"{sum(kinds.values())} layers with weights: {top}{', ...' if len(kinds) > 4 else ''}"


def mismatch(spec, include_top: bool, model, info: WeightsFile | None, error: Exception) -> str:
    """`expected` text when Keras could not load the file into the built backbone: both structures."""
    built = Counter(_class_kind(type(layer).__name__) for layer in model.layers if layer.weights)
    kinds = ", ".join(f"{n} {k}" for k, n in built.most_common(4))
    want = (f"weights of {spec.name} include_top={str(include_top).lower()} ({sum(built.values())} layers "
            f"with weights: {kinds})")
    if info is None:
        return f"{want}; Keras could not load it ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
    if info.kinds == built:
        return (f"{want}, but the file holds the same layers with other shapes: saved with another width "
                "(alpha) or input-channel count")
    return (f"{want}, but the file holds {info.summary()}: it was saved from another architecture, depth "
            "or input-channel count")


def _class_kind(class_name: str) -> str:
    """Keras' automatic layer name for a class: DepthwiseConv2D -> depthwise_conv2d."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower().replace("conv2_d", "conv2d")
