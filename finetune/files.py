"""Writing files a later run or user will read: atomically (temp file in the same folder + rename), so a
kill during a write leaves the old file or none, never a truncated one that a resume or `predict` loads.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside `path` with the same suffixes (Keras checks `.keras`,
    `.weights.h5`); on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def link_or_copy(source: Path, destination: Path) -> Path:
    """`destination` with the bytes of `source`: a hard link where both lie on one filesystem (no second
    copy on disk: a VGG16 model is ~60 MB a run), a copy elsewhere. Safe because every file finetune
    writes is replaced by a rename (`atomic_path`), never rewritten in place, so a later write to
    either name leaves the other as it was."""
    import shutil

    source, destination = Path(source), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, tmp)
    return destination


def save_model(model, path: Path) -> Path:
    """model.save(path), atomically, as an inference model (see `without_training_state`)."""
    _prime_keras_saving()
    with atomic_path(path) as tmp:
        without_training_state(model).save(tmp)
    return Path(path)


def without_training_state(model):
    """The same layers and weights without what only training needs: the optimizer (its state would
    triple the file of a model trained with Adam) and the compile config (optimizer, schedule, loss and
    metrics by name, which plain Keras cannot load when one is ours). What we save then loads with
    plain Keras; predict, evaluate and export only predict, and resuming reads its own checkpoints.

    A compiled functional model (what finetune builds) is re-wrapped over its own input and output
    tensors: the layers and their weights are shared, not copied, and the model itself stays compiled.
    An uncompiled model, or one without a symbolic graph to re-wrap (subclassed, or a Sequential never
    called), is saved as it is."""
    if getattr(model, "optimizer", None) is None and not getattr(model, "compiled", False):
        return model
    try:
        inputs, outputs = model.input, model.output
    except (AttributeError, ValueError):  # a subclassed model: no symbolic graph
        return model
    import keras

    return keras.Model(inputs, outputs, name=model.name)


def save_weights(model, path: Path) -> Path:
    """model.save_weights(path) (`.weights.h5`), atomically."""
    _prime_keras_saving()
    with atomic_path(path) as tmp:
        model.save_weights(tmp)
    return Path(path)


_SKIPSET_TYPES = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss")


def _prime_keras_saving() -> None:
    """Keras 3 (checked up to 3.15) caches the attribute skip-set of each object type when saving, but
    stores it under `saving_attr_skipset_<type>` and looks it up under `saving_attr_skiplist_<type>`, so
    every layer saved builds a throw-away Layer() again (MobileNetV2: 0.25 s of a 0.45 s save). Storing
    the set under the key it is looked up by changes nothing saved (the set is the same one Keras
    computes) and is redone after each clear_session(), which clears Keras' global state."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving import saving_lib
    except ImportError:  # another Keras layout: save the slow way
        return
    if not hasattr(saving_lib, "get_attr_skipset"):
        return
    for kind in _SKIPSET_TYPES:
        key = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(key, None) is None:
            try:
                global_state.set_global_attribute(key, saving_lib.get_attr_skipset(kind))
            except Exception:  # noqa: BLE001 - an optimisation only
                return
