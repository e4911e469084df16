"""Feature extraction: a backbone (or one of its layers) as an image -> vector model, and feature files.

A feature file (.npz or .parquet, never pickle) holds one row per image: the vector, its label (-1 when
unlabelled), its path (or "<split>/<index>" for in-memory data) and its split; `manifest.json` beside it
records how the vectors were made so a head trained on them can be reassembled with the same backbone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.errors import ConfigError, DataError

MANIFEST = "manifest.json"


def feature_model(backbone, preprocess, input_shape, layer: str | None, flatten: bool = True):
    """raw image -> preprocess -> backbone (or its `layer`) -> vector (flattened unless flatten=False).
    `preprocess` is the backbone's `finetune.model.preprocessing.preprocessing(mode)`."""
    import keras

    if layer:
        from finetune.model.hub import inner_layer_model

        names = [item.name for item in backbone.layers]
        inner = None if layer in names else inner_layer_model(backbone, layer)
        if inner is not None:  # a layer inside a KerasHub backbone
            backbone, layer = inner, None
        elif layer not in names:
            from finetune.errors import did_you_mean

            raise ConfigError("extract.layer", layer, f"a layer of {backbone.name}{did_you_mean(layer, names)}")
        if layer:
            backbone = keras.Model(backbone.inputs, backbone.get_layer(layer).output, name=f"{backbone.name}_{layer}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = backbone(preprocess(inputs), training=False)
    if flatten and len(x.shape) > 2:
        x = keras.layers.Flatten(name="flatten_features")(x)
    return keras.Model(inputs, x, name="feature_extractor")


def write_features(path: Path, fmt: str, features, labels, paths, splits) -> Path:
    from finetune.files import atomic_path

    path = path.with_suffix(f".{fmt}")
    with atomic_path(path) as tmp:
        _write_features(tmp, fmt, features, labels, paths, splits)
    return path


def _write_features(path: Path, fmt: str, features, labels, paths, splits) -> None:
    if fmt == "npz":
        np.savez_compressed(path, features=features.astype(np.float32), labels=labels.astype(np.int32),
                            paths=np.asarray(paths, dtype=str), splits=np.asarray(splits, dtype=str))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = features.shape[1]
        table = pa.table({
            "path": pa.array(paths, pa.string()), "split": pa.array(splits, pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.astype(np.float32).ravel()), dim),
        })
        pq.write_table(table, path)


def read_features(path) -> dict:
    """{"features" [N, D] float32, "labels" [N], "paths" [N], "splits" [N], "manifest" dict}."""
    path = Path(str(path)).expanduser()
    folder = path if path.is_dir() else path.parent
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise DataError(f"data.path: received '{path}'; expected the output folder of `finetune extract` "
                        f"(with {MANIFEST} and a features file)")
    manifest = json.loads(manifest_file.read_text())
    file = folder / manifest["file"] if path.is_dir() else path
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("features", "labels", "paths", "splits")}
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(file)
        arrays = {"features": np.stack(table.column("features").to_numpy(zero_copy_only=False)).astype(np.float32),
                  "labels": table.column("label").to_numpy(), "paths": np.asarray(table.column("path").to_pylist()),
                  "splits": np.asarray(table.column("split").to_pylist())}
    else:
        raise DataError(f"data.path: received '{file}'; expected a .npz or .parquet feature file")
    return {**arrays, "manifest": manifest}
