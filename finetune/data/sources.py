"""Dataset sources: find the images and labels of each split.

Pure python for `shapes`, `digits` and `folder` (numpy, PIL, scikit-learn; never tensorflow),
so the lead can validate a data config before importing TF. `tfds` imports
tensorflow_datasets (which itself does not import tensorflow until data is read).
"""
from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data._util import suggest
from finetune.errors import ConfigError, DataError

SOURCES = ("shapes", "digits", "folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_EXT_TEXT = " ".join(IMAGE_EXTENSIONS)
CACHE_MODES = ("auto", "memory", "off")
BAD_FILE_MODES = ("skip", "fail")
AUGMENT_MODES = ("none", "flip")
# Hosts that tfds downloads from (GCS mirror first, then the original hosts of popular sets).
TFDS_HOSTS = (("storage.googleapis.com", 443), ("download.tensorflow.org", 443))


@dataclass
class Split:
    """One split, in one of three forms: image files, in-memory arrays, or a tfds split spec."""
    paths: list[str] | None = None
    images: "np.ndarray | None" = None
    tfds_split: str | None = None
    labels: "np.ndarray | list[int] | None" = None
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


# ---------------------------------------------------------------------------------------------
# Config access (DictConfig, dict or any object with attributes)
# ---------------------------------------------------------------------------------------------
_MISSING = object()


def cfg_get(cfg, key: str, default=None):
    """cfg.key, or `default` when the key is absent (a present None stays None)."""
    if cfg is None:
        return default
    try:
        if isinstance(cfg, Mapping):
            return cfg.get(key, default)
        return getattr(cfg, key, default)
    except Exception:  # omegaconf: missing mandatory value ('???'), struct-mode access, ...
        return default


def _opt(cfg, key: str, default):
    """cfg.key, or `default` when absent or None."""
    value = cfg_get(cfg, key, None)
    return default if value is None else value


def _float(cfg, key: str, default: float) -> float:
    value = _opt(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"data.{key}", value, "a fraction between 0 and 1 (e.g. 0.2)")
    return float(value)


def _int(cfg, key: str, default: int, minimum: int) -> int:
    value = _opt(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.{key}", value, f"an integer >= {minimum}")
    return int(value)


def _choice(cfg, key: str, default: str, options) -> str:
    value = _opt(cfg, key, default)
    if value not in options:
        raise ConfigError(f"data.{key}", value, "one of " + ", ".join(options), suggest(value, options))
    return value


def _check_common(cfg) -> None:
    """Validates the fields every source shares (cache, augment, cache_max_mb, seed)."""
    _choice(cfg, "cache", "auto", CACHE_MODES)
    _choice(cfg, "augment", "none", AUGMENT_MODES)
    _int(cfg, "cache_max_mb", 2048, 0)
    _int(cfg, "seed", 0, 0)


def _fractions(cfg, default_test: float) -> tuple[float, float]:
    val = _float(cfg, "val_split", 0.2)
    test = _float(cfg, "test_split", default_test) if cfg_get(cfg, "test_split", 0) is not None else 0.0
    if val + test >= 1.0:
        raise ConfigError("data.val_split", val, f"val_split + test_split < 1 (test_split is {test})",
                          "leave a fraction of the images for training")
    return val, test


# ---------------------------------------------------------------------------------------------
# Stratified split
# ---------------------------------------------------------------------------------------------
def stratified_split(labels, num_classes: int, val: float, test: float, seed: int):
    """Per-class deterministic split into (train, val, test) index arrays.

    Each class keeps >= 1 training sample; with val > 0 each class with >= 2 samples gets >= 1
    validation sample. The training indices are shuffled (so class order does not leak into a
    small shuffle buffer); val and test keep class order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7919])
    parts = {"train": [], "val": [], "test": []}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        if n == 0:
            continue
        idx = idx[rng.permutation(n)]
        n_val = int(math.floor(n * val + 0.5))
        n_test = int(math.floor(n * test + 0.5))
        if val > 0 and n >= 2:
            n_val = max(n_val, 1)
        while n_val + n_test > n - 1:  # keep >= 1 training sample
            if n_test > 0 and (n_test >= n_val or n_val <= 1):
                n_test -= 1
            else:
                n_val -= 1
        parts["test"].append(np.sort(idx[:n_test]))
        parts["val"].append(np.sort(idx[n_test:n_test + n_val]))
        parts["train"].append(idx[n_test + n_val:])
    out = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
    out["train"] = out["train"][rng.permutation(len(out["train"]))]
    return out["train"], out["val"], out["test"]


def _file_split(paths: list[str], labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(paths=[paths[i] for i in idx], labels=labels[idx].astype(np.int32), size=len(idx))


def _split_files(name, class_names, paths, labels, cfg, default_test, *, val_split=None, test_split=None):
    """Dataset from one list of files, splitting off val/test unless given separately."""
    seed = _int(cfg, "seed", 0, 0)
    val_f, test_f = _fractions(cfg, default_test)
    labels = np.asarray(labels, np.int32)
    tr, va, te = stratified_split(labels, len(class_names), 0.0 if val_split else val_f,
                                  0.0 if test_split else test_f, seed)
    train = _file_split(paths, labels, tr)
    val = val_split or _file_split(paths, labels, va)
    test = test_split or (_file_split(paths, labels, te) if len(te) else None)
    if val.size == 0:
        raise DataError(f"data.val_split: the validation split of '{name}' is empty (val_split={val_f}); "
                        "set data.val_split > 0 (e.g. 0.2) or give data.val_path")
    return Dataset(name=name, class_names=list(class_names), train=train, val=val, test=test, source_cfg=cfg)


# ---------------------------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    """Image files under `folder`, recursively (symlinks followed once), sorted."""
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in files if _is_image(f))
    return sorted(out)


def scan_folder(path, key: str = "data.path", allow_empty: bool = False) -> dict[str, list[str]]:
    """{class name: sorted image paths} for a folder with one sub-folder per class.

    Raises ConfigError/DataError (one line, naming `key`) when the folder cannot be used.
    Pure python: never imports tensorflow.
    """
    expected = "an existing folder with one sub-folder per class"
    if path is None or str(path).strip() == "":
        raise ConfigError(key, path, expected, f"set {key}=/path/to/images")
    folder = Path(os.path.expandvars(str(path))).expanduser()
    if not folder.exists():
        raise ConfigError(key, str(path), expected)
    if not folder.is_dir():
        raise ConfigError(key, str(path), expected, "it is a file, not a folder")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{key}: cannot read '{folder}' ({e.strerror or e}); check its permissions") from e
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if not class_dirs:
        extra = (f"; found {len(loose)} images directly in it: move them into one sub-folder per class"
                 if loose else "")
        raise DataError(f"{key}: '{folder}' has no class sub-folders; expected one sub-folder per class "
                        f"holding images ({_EXT_TEXT}){extra}")
    classes = {e.name: _images_under(Path(e.path)) for e in class_dirs}
    if not allow_empty:
        empty = [c for c, files in classes.items() if not files]
        if empty:
            raise DataError(f"{key}: class folders without images ({_EXT_TEXT}) in '{folder}': "
                            f"{', '.join(map(repr, empty))}; add images to them or remove them")
    if len(classes) < 2:
        raise DataError(f"{key}: '{folder}' has only one class sub-folder ({next(iter(classes))!r}); "
                        "expected at least two, one per class")
    return classes


def _extra_split(cfg, key_name: str, class_names: list[str]) -> Split | None:
    """A separately given val/test folder; its class folders must match the training folder's."""
    path = cfg_get(cfg, key_name, None)
    if path is None or str(path).strip() == "":
        return None
    key = f"data.{key_name}"
    classes = scan_folder(path, key=key, allow_empty=True)
    if sorted(classes) != class_names:
        missing = sorted(set(class_names) - set(classes))
        extra = sorted(set(classes) - set(class_names))
        detail = "; ".join(p for p in (f"missing {missing}" if missing else "",
                                       f"not in data.path: {extra}" if extra else "") if p)
        raise DataError(f"{key}: class folders of '{path}' differ from data.path's {class_names} ({detail}); "
                        "use the same class sub-folder names")
    paths, labels = [], []
    for i, c in enumerate(class_names):
        paths += classes[c]
        labels += [i] * len(classes[c])
    if not paths:
        raise DataError(f"{key}: '{path}' holds no images ({_EXT_TEXT}); add images or unset {key}")
    return Split(paths=paths, labels=np.asarray(labels, np.int32), size=len(paths))


def _flatten(classes: dict[str, list[str]], class_names: list[str]):
    paths, labels = [], []
    for i, c in enumerate(class_names):
        paths += classes[c]
        labels += [i] * len(classes[c])
    return paths, np.asarray(labels, np.int32)


def _check_files(root: str, classes: dict[str, list[str]], extras: dict[str, Split | None], on_bad_file: str):
    """Pre-flight check of every file (scan.py): drops the bad ones (on_bad_file=skip) or raises.

    Returns (classes, extras, checks of the usable files by path, bad FileChecks)."""
    import time

    from finetune.data import scan

    everything = [p for files in classes.values() for p in files]
    for split in extras.values():
        everything += split.paths if split is not None else []
    start = time.perf_counter()
    checks = {c.path: c for c in scan.scan_files(everything, cache=scan.cache_file(root))}
    seconds = time.perf_counter() - start
    bad = [checks[p] for p in everything if not checks[p].ok]
    if bad and on_bad_file == "fail":
        shown = "; ".join(f"'{c.path}' ({c.describe()})" for c in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"data.on_bad_file=fail: {len(bad)} of {len(everything)} files cannot be used as images "
                        f"({scan.summary(bad)}): {shown}{more}; fix or remove them, or set data.on_bad_file=skip")
    if bad:
        print(f"data: skipped {len(bad)} of {len(everything)} files that cannot be used as images "
              f"({scan.summary(bad)}), e.g. '{bad[0].path}' ({bad[0].describe()}); `train` lists them in "
              "skipped_files.json (data.on_bad_file=fail stops instead)")
    if seconds > 2.0:
        print(f"data: checked {len(everything)} files in {seconds:.1f} s")
    if not bad:
        return classes, extras, checks, bad
    classes = {c: [p for p in files if checks[p].ok] for c, files in classes.items()}
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"data.path: class folders without a usable image after skipping {len(bad)} bad files: "
                        f"{', '.join(map(repr, empty))} (e.g. '{bad[0].path}': {bad[0].describe()}); "
                        "add images to them or remove them")
    kept = {}
    for key, split in extras.items():
        if split is not None:
            keep = [i for i, p in enumerate(split.paths) if checks[p].ok]
            if not keep:
                raise DataError(f"data.{key}: no usable image left after skipping {len(split.paths)} bad files "
                                f"(e.g. '{split.paths[0]}': {checks[split.paths[0]].describe()})")
            split = Split(paths=[split.paths[i] for i in keep],
                          labels=np.asarray(split.labels, np.int32)[keep], size=len(keep))
        kept[key] = split
    return classes, kept, checks, bad


def load_folder(cfg) -> Dataset:
    _check_common(cfg)
    on_bad_file = _choice(cfg, "on_bad_file", "skip", BAD_FILE_MODES)
    path = cfg_get(cfg, "path", None)
    classes = scan_folder(path)
    class_names = sorted(classes)
    extras = {"val_path": _extra_split(cfg, "val_path", class_names),
              "test_path": _extra_split(cfg, "test_path", class_names)}
    abspath = str(Path(os.path.expandvars(str(path))).expanduser().resolve())
    classes, extras, checks, bad = _check_files(abspath, classes, extras, on_bad_file)
    paths, labels = _flatten(classes, class_names)
    dataset = _split_files(f"folder:{abspath}", class_names, paths, labels, cfg, 0.0,
                           val_split=extras["val_path"], test_split=extras["test_path"])
    for part in (dataset.train, dataset.val, dataset.test):
        if part is not None:
            part.pillow = [checks[p].pillow for p in part.paths]
    dataset.skipped = [c.as_dict() for c in bad]
    return dataset


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def load_shapes(cfg) -> Dataset:
    from finetune.data import shapes

    _check_common(cfg)
    _fractions(cfg, 0.1)
    classes = shapes.validate_classes(_opt(cfg, "classes", shapes.DEFAULT_CLASSES))
    folder = shapes.ensure_shapes(
        classes,
        num_per_class=_opt(cfg, "num_per_class", 100),
        image_size=_opt(cfg, "image_size", 64),
        seed=_int(cfg, "seed", 0, 0),
        cache_dir=cfg_get(cfg, "cache_dir", None),
    )
    found = scan_folder(folder, key="data.cache_dir")
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"data.cache_dir: the shapes folder '{folder}' lacks classes {missing}; "
                        "delete that folder to regenerate it")
    paths, labels = _flatten(found, classes)
    return _split_files("shapes", classes, paths, labels, cfg, 0.1)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (uint8 N,8,8 in 0..255, int32 labels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int32)


def load_digits_dataset(cfg) -> Dataset:
    _check_common(cfg)
    val_f, test_f = _fractions(cfg, 0.1)
    images, labels = load_digits_arrays()
    tr, va, te = stratified_split(labels, 10, val_f, test_f, _int(cfg, "seed", 0, 0))

    def part(idx):
        return Split(images=images[idx], labels=labels[idx], size=len(idx))

    if len(va) == 0:
        raise DataError("data.val_split: the validation split of 'digits' is empty; set data.val_split > 0")
    return Dataset(name="digits", class_names=[str(i) for i in range(10)], train=part(tr), val=part(va),
                   test=part(te) if len(te) else None, source_cfg=cfg)


# ---------------------------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------------------------
def _proxy_target():
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        url = os.environ.get(var)
        if url:
            from urllib.parse import urlsplit

            parts = urlsplit(url if "://" in url else "http://" + url)
            if parts.hostname:
                return parts.hostname, parts.port or 8080
    return None


def network_reachable(hosts=TFDS_HOSTS, timeout: float = 3.0) -> bool:
    """True if a TCP connection to any of `hosts` (or the https proxy) succeeds within ~timeout s.

    DNS lookups run in daemon threads too, so a hanging resolver cannot stall the caller.
    """
    proxy = _proxy_target()
    targets = [proxy] if proxy else list(hosts)
    ok = threading.Event()

    def probe(host, port):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = timeout + 0.5
    import time

    end = time.monotonic() + deadline
    while time.monotonic() < end and not ok.is_set() and any(t.is_alive() for t in threads):
        ok.wait(0.05)
    return ok.is_set()


def _tfds_dataset_name(cfg) -> tuple[str, str]:
    """(tfds dataset name, config key it came from)."""
    for key in ("dataset", "tfds_name"):
        value = cfg_get(cfg, key, None)
        if value:
            return str(value), f"data.{key}"
    name = str(cfg_get(cfg, "name", ""))
    if name.startswith("tfds:"):
        return name[5:], "data.name"
    if name and name != "tfds":
        return name, "data.name"
    raise ConfigError("data.dataset", None, "a tensorflow-datasets name (e.g. tf_flowers)",
                      "set data.dataset=tf_flowers")


def _tfds_split_spec(cfg, key: str, default):
    value = cfg_get(cfg, key, _MISSING)
    if value is _MISSING:
        value = default
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if key == "test_split":
            return None
        raise ConfigError(f"data.{key}", value, "a tfds split like 'train[80%:90%]'")
    if not isinstance(value, str):
        raise ConfigError(f"data.{key}", value, "a tfds split string like 'train[80%:90%]' (tfds splits "
                          "are strings, not fractions)")
    return value


def _split_size(info, spec: str, key: str) -> int:
    """Examples in `spec` from the split info (0 when the info has no splits, e.g. under mock)."""
    if not info.splits:
        return 0
    try:
        return int(info.splits[spec].num_examples)
    except Exception as e:  # unknown split name / bad slice
        raise ConfigError(f"data.{key}", spec, f"a split of this dataset ({', '.join(info.splits)}), "
                          "optionally sliced like 'train[:80%]'") from e


def load_tfds(cfg) -> Dataset:
    _check_common(cfg)
    dataset, name_key = _tfds_dataset_name(cfg)
    train_spec = _tfds_split_spec(cfg, "train_split", "train[:80%]")
    val_spec = _tfds_split_spec(cfg, "val_split", "train[80%:90%]")
    test_spec = _tfds_split_spec(cfg, "test_split", "train[90%:]")
    data_dir = cfg_get(cfg, "data_dir", None)
    data_dir = str(Path(os.path.expandvars(str(data_dir))).expanduser()) if data_dir else None
    download = _opt(cfg, "download", True)
    if not isinstance(download, bool):
        raise ConfigError("data.download", download, "true or false")

    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        try:
            known = tfds.list_builders(with_community_datasets=False)
        except Exception:
            known = []
        raise ConfigError(name_key, dataset, "a tensorflow-datasets name (e.g. tf_flowers, mnist)",
                          (suggest(dataset.split("/")[0].split(":")[0], known)
                           + " Catalog: https://www.tensorflow.org/datasets/catalog").strip()) from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name_key}: cannot load tfds dataset {dataset!r}: {first}") from e

    root = str(builder.data_dir_root)
    if not builder.is_prepared():
        how = (f"on a connected machine run `tfds build {dataset} --data_dir DIR` (or "
               f"python -c \"import tensorflow_datasets as tfds; tfds.load('{dataset}', data_dir='DIR')\"), "
               f"copy DIR here and pass data.data_dir=DIR data.download=false")
        if not download:
            raise DataError(f"data.data_dir: tfds dataset {dataset!r} is not prepared in '{root}' and "
                            f"data.download=false; {how}")
        if not network_reachable():
            raise DataError(f"data.data_dir: cannot download tfds dataset {dataset!r} (no network) and it is "
                            f"not prepared in '{root}'; {how}")
        try:
            builder.download_and_prepare()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.data_dir: downloading tfds dataset {dataset!r} into '{root}' failed: "
                            f"{first}; retry, or {how}") from e

    info = builder.info
    features = info.features
    sup = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_key = cfg_get(cfg, "image_key", None) or (sup[0] if sup and isinstance(sup[0], str) else "image")
    label_key = cfg_get(cfg, "label_key", None) or (sup[1] if sup and isinstance(sup[1], str) else "label")
    keys = list(features.keys()) if hasattr(features, "keys") else []
    for key, value, what in (("image_key", image_key, "an image feature"), ("label_key", label_key,
                                                                             "a ClassLabel feature")):
        if value not in keys:
            raise ConfigError(f"data.{key}", value, f"{what} of {dataset!r}: one of {', '.join(keys)}",
                              suggest(value, keys))
    label_feature = features[label_key]
    class_names = list(getattr(label_feature, "names", None) or [])
    if not class_names:
        raise ConfigError("data.label_key", label_key, f"a ClassLabel feature of {dataset!r} (with class names)")
    image_feature = features[image_key]
    shape = tuple(getattr(image_feature, "shape", ()) or ())
    if len(shape) not in (2, 3):
        raise ConfigError("data.image_key", image_key, f"a 2-D image feature of {dataset!r} (got shape {shape})")

    def split(spec, key):
        return Split(tfds_split=spec, size=_split_size(info, spec, key)) if spec else None

    return Dataset(
        name=f"tfds:{dataset}", class_names=class_names,
        train=split(train_spec, "train_split"), val=split(val_spec, "val_split"),
        test=split(test_spec, "test_split"), source_cfg=cfg,
        extra={"dataset": dataset, "data_dir": data_dir, "image_key": image_key, "label_key": label_key,
               "image_shape": shape},
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
_LOADERS = {"shapes": load_shapes, "digits": load_digits_dataset, "folder": load_folder, "tfds": load_tfds}


def source_of(cfg) -> str:
    """Which source a data config selects.

    `data.source` if set; else `data.name` when it is shapes/digits/folder/tfds; a name like
    'tfds:tf_flowers', or any other name in a config that has tfds fields (train_split), is tfds.
    """
    source = cfg_get(cfg, "source", None)
    name = cfg_get(cfg, "name", None)
    if source:
        if source not in SOURCES:
            raise ConfigError("data.source", source, "one of " + ", ".join(SOURCES),
                              suggest(source, SOURCES))
        return source
    if name in SOURCES:
        return name
    if isinstance(name, str) and (name.startswith("tfds:") or cfg_get(cfg, "train_split", None) is not None):
        return "tfds"
    raise ConfigError("data.name", name, "one of " + ", ".join(SOURCES), suggest(name, SOURCES))


def load_dataset(cfg) -> Dataset:
    """Resolves the data config to a Dataset (file lists / arrays / tfds specs, labels, splits).

    Raises ConfigError/DataError with a one-line message. Never imports tensorflow for
    shapes/digits/folder.
    """
    return _LOADERS[source_of(cfg)](cfg)
