"""`data=folder`: one sub-folder per class under data.path, checked file by file before training.

Pure python: never imports tensorflow.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from finetune.data.dataset import Dataset, Split
from finetune.data.split import split_files
from finetune.errors import ConfigError, DataError
from finetune.registry import lookup

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_EXT_TEXT = " ".join(IMAGE_EXTENSIONS)
# data.on_bad_file -> whether a file that cannot be used as an image stops the run
STOP_ON_BAD_FILE = {"skip": False, "fail": True}


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


def _expand(path) -> Path:
    return Path(os.path.expandvars(str(path))).expanduser()


def _class_entries(path, key: str) -> tuple[Path, list]:
    """(the folder, its sorted entries), or a one-line error naming `key`."""
    expected = "an existing folder with one sub-folder per class"
    if path is None or str(path).strip() == "":
        raise ConfigError(key, path, expected, f"set {key}=/path/to/images")
    folder = _expand(path)
    if not folder.exists():
        raise ConfigError(key, str(path), expected)
    if not folder.is_dir():
        raise ConfigError(key, str(path), expected, "it is a file, not a folder")
    try:
        return folder, sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{key}: cannot read '{folder}' ({e.strerror or e}); check its permissions") from e


def scan_folder(path, key: str = "data.path", allow_empty: bool = False) -> dict[str, list[str]]:
    """{class name: sorted image paths} for a folder with one sub-folder per class.

    Raises ConfigError/DataError (one line, naming `key`) when the folder cannot be used.
    Pure python: never imports tensorflow.
    """
    folder, entries = _class_entries(path, key)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if not class_dirs:
        extra = (f"; found {len(loose)} images directly in it: move them into one sub-folder per class"
                 if loose else "")
        raise DataError(f"{key}: '{folder}' has no class sub-folders; expected one sub-folder per class "
                        f"holding images ({_EXT_TEXT}){extra}")
    classes = {e.name: _images_under(Path(e.path)) for e in class_dirs}
    empty = [c for c, files in classes.items() if not files]
    if empty and not allow_empty:
        raise DataError(f"{key}: class folders without images ({_EXT_TEXT}) in '{folder}': "
                        f"{', '.join(map(repr, empty))}; add images to them or remove them")
    if len(classes) < 2:
        raise DataError(f"{key}: '{folder}' has only one class sub-folder ({next(iter(classes))!r}); "
                        "expected at least two, one per class")
    return classes


def flatten_classes(classes: dict[str, list[str]], class_names: list[str]):
    paths, labels = [], []
    for i, c in enumerate(class_names):
        paths += classes[c]
        labels += [i] * len(classes[c])
    return paths, np.asarray(labels, np.int32)


def _extra_split(path, key_name: str, class_names: list[str]) -> Split | None:
    """A separately given val/test folder; its class folders must match the training folder's."""
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
    paths, labels = flatten_classes(classes, class_names)
    if not paths:
        raise DataError(f"{key}: '{path}' holds no images ({_EXT_TEXT}); add images or unset {key}")
    return Split(paths=paths, labels=labels, size=len(paths))


def _scan_all(root: str, everything: list[str]) -> dict:
    """The pre-flight verdict of every file (scan.py), by path."""
    from finetune.data import scan

    start = time.perf_counter()
    checks = {c.path: c for c in scan.scan_files(everything, cache=scan.cache_file(root))}
    if time.perf_counter() - start > 2.0:
        print(f"data: checked {len(everything)} files in {time.perf_counter() - start:.1f} s")
    return checks


def _report_bad(bad: list, total: int, stop: bool) -> None:
    from finetune.data import scan

    if bad and stop:
        shown = "; ".join(f"'{c.path}' ({c.describe()})" for c in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"data.on_bad_file=fail: {len(bad)} of {total} files cannot be used as images "
                        f"({scan.summary(bad)}): {shown}{more}; fix or remove them, or set data.on_bad_file=skip")
    if bad:
        print(f"data: skipped {len(bad)} of {total} files that cannot be used as images "
              f"({scan.summary(bad)}), e.g. '{bad[0].path}' ({bad[0].describe()}); `train` lists them in "
              "skipped_files.json (data.on_bad_file=fail stops instead)")


def _without_bad(classes, extras, checks, bad):
    """`classes` and `extras` without the files that failed the scan; an error where none is left."""
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
    return classes, kept


def _check_files(root: str, classes: dict[str, list[str]], extras: dict[str, Split | None], stop: bool):
    """Pre-flight check of every file: drops the bad ones (data.on_bad_file=skip) or raises (fail).

    Returns (classes, extras, checks of the usable files by path, bad FileChecks)."""
    everything = [p for files in classes.values() for p in files]
    for split in extras.values():
        everything += split.paths if split is not None else []
    checks = _scan_all(root, everything)
    bad = [checks[p] for p in everything if not checks[p].ok]
    _report_bad(bad, len(everything), stop)
    if bad:
        classes, extras = _without_bad(classes, extras, checks, bad)
    return classes, extras, checks, bad


def load_folder(opts) -> Dataset:
    stop = lookup(STOP_ON_BAD_FILE, "data.on_bad_file", opts.on_bad_file)
    classes = scan_folder(opts.path)
    class_names = sorted(classes)
    extras = {"val_path": _extra_split(opts.val_path, "val_path", class_names),
              "test_path": _extra_split(opts.test_path, "test_path", class_names)}
    abspath = str(_expand(opts.path).resolve())
    classes, extras, checks, bad = _check_files(abspath, classes, extras, stop)
    paths, labels = flatten_classes(classes, class_names)
    dataset = split_files(f"folder:{abspath}", class_names, paths, labels, opts,
                          val_split=extras["val_path"], test_split=extras["test_path"])
    for part in (dataset.train, dataset.val, dataset.test):
        if part is not None:
            part.pillow = [checks[p].pillow for p in part.paths]
    dataset.skipped = [c.as_dict() for c in bad]
    return dataset
