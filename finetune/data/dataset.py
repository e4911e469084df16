"""What a data source produces (a Dataset of Splits), and a data config read with the schema's defaults.

Pure python: never imports tensorflow.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

from finetune.config.schema import DATA_SCHEMAS, choice

_ABSENT = object()


@dataclass
class Split:
    """One split, in one of three forms: image files, in-memory arrays, or a tfds split spec."""
    paths: list[str] | None = None
    images: "np.ndarray | None" = None  # noqa: F821 - numpy, only named here
    tfds_split: str | None = None
    labels: "np.ndarray | list[int] | None" = None  # noqa: F821
    size: int = 0
    # per file (with `paths`): decode with Pillow instead of TensorFlow (EXIF rotation, BMP, ...); see scan.py
    pillow: "list[bool] | None" = None


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split | None
    source_cfg: object
    # Resolved source details the pipeline needs (tfds: dataset, data_dir, image_key, label_key).
    extra: dict = field(default_factory=dict)
    # files left out by the pre-flight scan (data.on_bad_file=skip): [{"path", "problem", "detail"}]
    skipped: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict:
        return {"train": self.train.size, "val": self.val.size, "test": self.test.size if self.test else 0}


def cfg_get(cfg, key: str, default=None):
    """cfg.key (DictConfig, dict or any object with attributes), or `default` when the key is absent or
    a mandatory value ('???') is unset; a present None stays None."""
    if cfg is None:
        return default
    try:
        if isinstance(cfg, Mapping):
            return cfg.get(key, default)
        return getattr(cfg, key, default)
    except Exception:  # omegaconf: missing mandatory value ('???'), struct-mode access, ...
        return default


def _keys(cfg) -> list[str]:
    if isinstance(cfg, Mapping):
        return [str(k) for k in cfg.keys()]
    return list(vars(cfg)) if hasattr(cfg, "__dict__") else []


def _schema_default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return None if value == "???" else value  # MISSING: no default (e.g. folder's path)


def data_options(cfg, source: str) -> SimpleNamespace:
    """The data config of `source` with the schema's default (finetune.config.schema, their one home)
    for every key it leaves out or sets to None where the schema does not allow None; enums as plain
    strings. Keys the schema lacks (e.g. tfds' `dataset` in a plain dict) are kept."""
    schema = DATA_SCHEMAS[source]
    hints = typing.get_type_hints(schema)
    values = {}
    for f in dataclasses.fields(schema):
        value = cfg_get(cfg, f.name, _ABSENT)
        nullable = type(None) in typing.get_args(hints[f.name])
        if value is _ABSENT or value == "???" or (value is None and not nullable):
            value = _schema_default(f)
        values[f.name] = choice(value)
    for key in _keys(cfg):
        values.setdefault(key, choice(cfg_get(cfg, key)))
    return SimpleNamespace(**values)
