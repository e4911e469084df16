"""Resumable training: a checkpoint at every epoch end, and finding the run that a re-run continues.

A checkpoint lives in `<run dir>/checkpoint/`: `state.json` (stage, epochs done, history, MLflow run id)
pointing at `<tag>.weights.npz` (the head's weights, and the backbone's once any of it has changed) and
`<tag>.optimizer.npz` (the optimizer's variables mid-stage: step count, moments). Every file is written
atomically and state.json last, so a kill at any point leaves the previous complete checkpoint.
A frozen backbone is not saved per epoch: it is rebuilt from the config exactly (seeded init or file).

The run index (`$FINETUNE_CACHE_DIR/runs/<config hash>.json`, default ~/.cache/finetune/runs) maps a
config to the run directory of its last interrupted run, so that the same command continues it. A run
that ends (finished, or failed on an error) removes its entry; a killed or terminated one leaves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import numpy as np

from finetune import files
from finetune.config.paths import cache_dir

STATE_FILE = "state.json"
FOLDER = "checkpoint"
# config keys that do not change what is trained: a re-run that differs only in these still continues
IGNORED_KEYS = {("trainer", "resume"), ("trainer", "verbose"), ("trainer", "checkpoint")}


def config_hash(cfg) -> str:
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for section, key in IGNORED_KEYS:
        resolved.get(section, {}).pop(key, None)
    resolved.pop("hydra", None)
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# -- the run index -------------------------------------------------------------------------------------
def index_root() -> Path:
    return cache_dir("runs")


def record_run(key: str, out_dir: Path, run_id: str) -> None:
    files.write_text(index_root() / f"{key}.json", json.dumps({
        "out_dir": str(Path(out_dir).resolve()), "run_id": run_id, "pid": os.getpid(),
        "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))


def forget_run(key: str) -> None:
    (index_root() / f"{key}.json").unlink(missing_ok=True)


def interrupted_run(key: str) -> dict | None:
    """{"out_dir", "run_id", ...} of this config's interrupted run with a checkpoint, else None. A run
    whose process is still alive on this machine is not interrupted: it is running."""
    entry_file = index_root() / f"{key}.json"
    try:
        entry = json.loads(entry_file.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("host") == socket.gethostname() and _alive(int(entry.get("pid", -1))):
        return None
    if not (Path(entry["out_dir"]) / FOLDER / STATE_FILE).is_file():
        return None
    return entry


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# -- checkpoints -----------------------------------------------------------------------------------------
def weight_arrays(backbone, head_layers, with_backbone: bool) -> dict:
    arrays = {}
    for j, layer in enumerate(head_layers):
        for k, weight in enumerate(layer.weights):
            arrays[f"head/{j}/{k}"] = np.asarray(weight.numpy())
    if with_backbone:
        for i, weight in enumerate(backbone.weights):
            arrays[f"backbone/{i}"] = np.asarray(weight.numpy())
    return arrays


def assign_weights(arrays: dict, backbone, head_layers) -> None:
    def put(weight, key):
        value = arrays[key]
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(f"checkpoint {key}: shape {value.shape} does not match the model's {weight.shape}")
        weight.assign(value)

    for j, layer in enumerate(head_layers):
        for k, weight in enumerate(layer.weights):
            put(weight, f"head/{j}/{k}")
    if any(key.startswith("backbone/") for key in arrays):
        for i, weight in enumerate(backbone.weights):
            put(weight, f"backbone/{i}")


def optimizer_arrays(optimizer) -> dict:
    store = {}
    optimizer.save_own_variables(store)
    return store


def restore_optimizer(model, arrays: dict) -> None:
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if len(arrays) != len(optimizer.variables):
        raise ValueError(f"checkpoint optimizer state has {len(arrays)} variables; this stage's optimizer "
                         f"has {len(optimizer.variables)}")
    optimizer.load_own_variables(arrays)


class Checkpoints:
    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / FOLDER

    def save(self, state: dict, weights: dict, optimizer: dict | None) -> None:
        tag = f"epoch{state['epoch']:04d}-stage{state['stage']}-{'mid' if optimizer is not None else 'start'}"
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_npz(self.folder / f"{tag}.weights.npz", weights)
        state = {**state, "weights_file": f"{tag}.weights.npz", "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        if optimizer is not None:
            _save_npz(self.folder / f"{tag}.optimizer.npz", optimizer)
            state["optimizer_file"] = f"{tag}.optimizer.npz"
        else:
            state["optimizer_file"] = None
        files.write_text(self.folder / STATE_FILE, json.dumps(state, indent=1, default=float))
        keep = {state["weights_file"], state["optimizer_file"]}
        for old in self.folder.glob("*.npz"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def load(self) -> dict | None:
        """{"state", "weights", "optimizer"} of the last complete checkpoint, or None."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text())
            weights = _load_npz(self.folder / state["weights_file"])
            optimizer = _load_npz(self.folder / state["optimizer_file"]) if state.get("optimizer_file") else None
        except (OSError, ValueError, KeyError):
            return None
        return {"state": state, "weights": weights, "optimizer": optimizer}


def _save_npz(path: Path, arrays: dict) -> None:
    with files.atomic_path(path) as tmp:
        np.savez(tmp, **{key.replace("/", "__"): value for key, value in arrays.items()})


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key.replace("__", "/"): data[key] for key in data.files}
