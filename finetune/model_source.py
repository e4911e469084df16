"""Finding a trained model: an MLflow run id, a models:/ URI, or a path to a .keras file.

A model folder (what `finetune train` writes and logs as the run's `model/` artifact) holds
model.keras, label_map.json (class names, input shape, preprocessing) and config.yaml.
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

    def load(self):
        return load_model(self.model_path)


def load_model(path):
    """Load a .keras file in Keras safe mode (no arbitrary code); finetune's layers are registered."""
    import keras

    import finetune.preprocessing  # noqa: F401  registers BackbonePreprocess for deserialization

    return keras.saving.load_model(str(path), safe_mode=True)


def resolve_model(ref: str, cfg_tracking, download_dir: Path) -> ModelBundle:
    """Local files of the model `ref` names; downloads MLflow artifacts into `download_dir`."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return _bundle_from_folder(path.parent if path.is_file() else path, ref, run_id=None,
                                   model_file=path if path.is_file() else None)
    if ref.startswith(("models:/", "runs:/")) or RUN_ID.match(ref):
        return _bundle_from_mlflow(ref, cfg_tracking, download_dir)
    raise ConfigError("model", ref, "an MLflow run id, a models:/<name>/<version> URI, "
                                    "or the path of a .keras file (or its folder)")


def _bundle_from_mlflow(ref: str, cfg_tracking, download_dir: Path) -> ModelBundle:
    import os

    import mlflow

    from finetune.tracking import tracking_uri

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

    match = re.match(r"^models:/([^/@]+)/(\d+)$", uri)
    if not match:
        return None
    return MlflowClient().get_model_version(match.group(1), match.group(2)).run_id


def _bundle_from_folder(folder: Path, ref: str, run_id: str | None, model_file: Path | None = None) -> ModelBundle:
    model_file = model_file or next(iter(sorted(folder.rglob("*.keras"))), None)
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
