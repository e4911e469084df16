"""Finding a trained model: an MLflow run id, a models:/ URI (version or alias), or a path to a .keras file.

A model folder (what `finetune train` writes and logs as the run's `model/` artifact) holds
model.keras, label_map.json (class names, input shape, preprocessing) and config.yaml. A sweep's
head-only job holds its head and backbone weights instead: model.keras is assembled on first load
(finetune.model.deferred).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import ConfigError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ModelBundle:
    model_path: Path
    label_map: dict
    config: object | None          # the training config (OmegaConf) when it was saved beside the model
    run_id: str | None             # the MLflow run that produced it, when known

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map["class_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.label_map["input_shape"])

    def load(self, safe_mode: bool = True):
        return load_model(self.model_path, safe_mode=safe_mode)


SAFE_MODE_KEY = "model_safe_mode"


def load_model(path, safe_mode: bool = True, compile: bool = True):
    """Load a .keras file in Keras safe mode (no arbitrary code). What finetune saves now holds Keras'
    built-in layers only; models saved before then hold BackbonePreprocess, registered here.

    A model holding Python code (a Lambda layer's function, any deserialized lambda) would run that code
    when loaded: refused with one line unless the user opts in with model_safe_mode=false."""
    import keras

    import finetune.model.preprocessing  # noqa: F401  registers BackbonePreprocess (older models)

    try:
        return keras.saving.load_model(str(path), safe_mode=safe_mode, compile=compile)
    except Exception as error:  # noqa: BLE001 - Keras raises ValueError/TypeError/OSError here
        text = str(error)
        if safe_mode and ("safe_mode" in text or "unsafe_deserialization" in text):
            what = "a Lambda layer's Python function" if "Lambda" in text else "Python code (a lambda)"
            raise ConfigError("model", str(path), f"a .keras model without code, but it holds {what}, which "
                                                  "would run when loaded; refused in Keras safe mode",
                              f"If you trust this file, add {SAFE_MODE_KEY}=false") from None
        raise ConfigError("model", str(path), f"a .keras model Keras can load (loading failed: "
                                              f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''})"
                          ) from error


def resolve_model(ref: str, cfg_tracking, download_dir: Path, safe_mode: bool = True) -> ModelBundle:
    """Local files of the model `ref` names; downloads MLflow artifacts into `download_dir`. In safe mode a
    model whose config holds Python code is refused here, before TensorFlow is imported."""
    bundle = _resolve(str(ref), cfg_tracking, download_dir)
    if safe_mode:
        check_no_code(bundle.model_path)
    return bundle


def check_no_code(model_file: Path) -> None:
    """ConfigError when the .keras archive's config.json holds a Lambda layer or a serialized Python
    function (what Keras safe mode refuses to load); read with zipfile + json only."""
    import zipfile

    try:
        with zipfile.ZipFile(model_file) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return  # not readable here: Keras' loader says what is wrong with it
    found = _code_in(config)
    if found:
        raise ConfigError("model", str(model_file),
                          f"a .keras model without code, but it holds {found}, which would run when "
                          "loaded; refused in Keras safe mode", f"If you trust this file, add {SAFE_MODE_KEY}=false")


def _code_in(node) -> str | None:
    if isinstance(node, dict):
        if node.get("class_name") == "Lambda":
            name = node.get("config", {}).get("name", "") if isinstance(node.get("config"), dict) else ""
            return f"a Lambda layer{f' ({name!r})' if name else ''} with a Python function"
        if node.get("class_name") == "__lambda__":
            return "a serialized Python function (lambda)"
        for value in node.values():
            found = _code_in(value)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _code_in(value)
            if found:
                return found
    return None


def _resolve(ref: str, cfg_tracking, download_dir: Path) -> ModelBundle:
    path = Path(ref).expanduser()
    if path.exists():
        return _bundle_from_folder(path.parent if path.is_file() else path, ref, run_id=None,
                                   model_file=path if path.is_file() else None)
    if ref.startswith(("models:/", "runs:/")) or RUN_ID.match(ref):
        return _bundle_from_mlflow(ref, cfg_tracking, download_dir)
    raise ConfigError("model", ref, "an MLflow run id, a models:/<name>/<version> or models:/<name>@<alias> URI, "
                                    "or the path of a .keras file (or its folder)")


def _bundle_from_mlflow(ref: str, cfg_tracking, download_dir: Path) -> ModelBundle:
    import os

    import mlflow

    from finetune.tracking.store import tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file is noise here
    mlflow.set_tracking_uri(tracking_uri(cfg_tracking))
    uri = f"runs:/{ref}/model" if RUN_ID.match(ref) else ref
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_dir)))
    except Exception as error:  # noqa: BLE001 - MLflow raises several kinds; all mean "not found here"
        raise ConfigError("model", ref, f"a model in the MLflow store {mlflow.get_tracking_uri()} "
                                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
    run_id = ref if RUN_ID.match(ref) else _run_of_model_version(ref)
    return _bundle_from_folder(local, ref, run_id=run_id)


def _run_of_model_version(uri: str) -> str | None:
    from mlflow import MlflowClient

    version = re.match(r"^models:/([^/@]+)/(\d+)$", uri)
    if version:
        return MlflowClient().get_model_version(version.group(1), version.group(2)).run_id
    alias = re.match(r"^models:/([^/@]+)@([^/@]+)$", uri)
    if alias:
        return MlflowClient().get_model_version_by_alias(alias.group(1), alias.group(2)).run_id
    return None


def _bundle_from_folder(folder: Path, ref: str, run_id: str | None, model_file: Path | None = None) -> ModelBundle:
    model_file = _model_file(folder, model_file)
    if model_file is None or model_file.suffix != ".keras":
        raise ConfigError("model", ref, "a .keras model saved by finetune train (or a folder holding one)")
    labels = model_file.parent / "label_map.json"
    if not labels.is_file():
        raise ConfigError("model", ref, f"a model with its label_map.json beside it (missing: {labels})")
    config_file = model_file.parent / "config.yaml"
    config = None
    if config_file.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.load(config_file)
    return ModelBundle(model_path=model_file, label_map=json.loads(labels.read_text()),
                       config=config, run_id=run_id)


def _model_file(folder: Path, model_file: Path | None) -> Path | None:
    """The folder's .keras model; a sweep job's deferred model folder (its head and backbone weights,
    finetune.model.deferred) gets its model.keras assembled now, once."""
    from finetune.model import deferred

    if model_file is not None and model_file.name == deferred.HEAD_FILE:  # the head file itself was named
        folder, model_file = model_file.parent, None
    if model_file is not None:
        return model_file
    for candidate in [folder, *sorted(p.parent for p in folder.rglob(deferred.HEAD_FILE))]:
        if deferred.is_deferred(candidate):
            print(f"   assembling {candidate / deferred.MODEL_FILE} from its head and backbone weights")
            return deferred.assemble(candidate)
    return next(iter(sorted(p for p in folder.rglob("*.keras") if p.name != deferred.HEAD_FILE)), None)
