"""The trained model in MLflow's own format: a run's `mlflow_model/` artifact (the `keras` flavor, with a
signature and pinned requirements), which `mlflow models serve`, `mlflow.pyfunc.load_model` and the model
registry take as it is.

A run's artifacts then hold the model twice, under distinct names:
  model/          model.keras + label_map.json + config.yaml: what finetune's commands load (runs:/<id>/model);
                  a sweep's head-only job logs head.keras + backbone.weights.h5 instead, until model.keras
                  is assembled (finetune.model.deferred)
  mlflow_model/   MLmodel, requirements, data/model.keras (the same file) + label_map.json + config.yaml
The second is written from the first without TensorFlow work: Keras' file is linked (or copied), not saved again, and
the signature comes from the label map (images of the model's input shape, 0-255 floats, in; one
probability per class out). So a run that did not log it (an older one) gets it on demand
(`finetune compare compare.register=...`).

Two things MLflow would do by default are not done here: inferring the requirements loads the model in a
subprocess (a TensorFlow import, seconds per run), so they are given; and no input example is saved, as
MLflow's Keras path for it fails on Keras 3 models (mlflow#16183); the signature says what goes in."""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from finetune import files

FOLDER = "mlflow_model"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


class _SavedKerasFile:
    """What mlflow.keras.save_model saves: it calls `model.save(path)`; this copies the file finetune
    already saved (same bytes, no second save: a hard link where it can be, see files.link_or_copy)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def save(self, destination, **_):
        files.link_or_copy(self.path, destination)


def signature(label_map: dict):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    height, width, channels = (int(v) for v in label_map["input_shape"])
    classes = len(label_map["class_names"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, channels), INPUT_NAME)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), OUTPUT_NAME)]))


def requirements() -> list[str]:
    """The packages that load and run the model, at this environment's versions."""
    pins = []
    for package in ("mlflow", "keras", "tensorflow"):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:  # e.g. tensorflow-cpu installed instead: name it unpinned
            pins.append(package)
    return pins


def write(model_folder: Path, destination: Path) -> Path:
    """`destination`: the MLflow model of finetune's model folder (model.keras, label_map.json, config.yaml)."""
    import mlflow.keras

    model_folder, destination = Path(model_folder), Path(destination)
    label_map = json.loads((model_folder / "label_map.json").read_text())
    shutil.rmtree(destination, ignore_errors=True)
    mlflow.keras.save_model(_SavedKerasFile(model_folder / "model.keras"), str(destination),
                            signature=signature(label_map), pip_requirements=requirements(),
                            metadata={"class_names": label_map["class_names"], "input_range": [0, 255],
                                      "written_by": "finetune"})
    for name in ("label_map.json", "config.yaml"):  # beside data/model.keras: finetune's loaders find them
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, destination / "data" / name)
    return destination


def ensure_logged(client, run_id: str, work: Path) -> str:
    """The artifact URI of the run's MLflow model; a run without one (trained before finetune logged it,
    or with tracking.log_model=false but a model folder) gets it now, from its `model/` artifact."""
    run = client.get_run(run_id)
    if not any(a.path == f"{FOLDER}/MLmodel" for a in client.list_artifacts(run_id, FOLDER)):
        from finetune.model import deferred

        logged = {a.path for a in client.list_artifacts(run_id, "model")}
        if not logged & {f"model/{deferred.MODEL_FILE}", f"model/{deferred.HEAD_FILE}"}:
            from finetune.errors import ConfigError

            raise ConfigError("compare.register", run_id, "a best run that logged its model (model/model.keras); "
                                                          "it was trained with tracking.log_model=false")
        local = Path(client.download_artifacts(run_id, "model", str(work)))
        if deferred.is_deferred(local):  # a sweep job's head + backbone weights: model.keras, assembled once
            client.log_artifact(run_id, str(deferred.assemble(local)), "model")
        client.log_artifacts(run_id, str(write(local, work / FOLDER)), FOLDER)
    return f"{run.info.artifact_uri.rstrip('/')}/{FOLDER}"


def register_with_alias(client, run_id: str, name: str, alias: str, work: Path) -> str:
    """A new version of registered model `name` from the run's MLflow model, and `alias` pointing at it;
    returns the version."""
    from mlflow.exceptions import MlflowException

    source = ensure_logged(client, run_id, work)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = client.create_model_version(name, source=source, run_id=run_id).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)
