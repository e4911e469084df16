"""The trained model in MLflow's format: logged by every train run (mlflow_model/), served by
`mlflow models serve --env-manager local`, loaded by mlflow.pyfunc, registered with an alias by
`finetune compare`, and usable as model=models:/<name>@<alias>: all giving finetune predict's numbers."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import TINY, TINY_SHAPES, printed_model_file, runs_of, sweep_runs, write_shape_images
from tests.test_team_server import free_port

pytestmark = pytest.mark.slow

EXPERIMENT = "mlflow_model"
CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def sweep(cli, mlflow_client, store):
    """A 2-job head-only sweep (one process); its parent and children."""
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "freeze=all", "optimizer.lr=1e-3,1e-2", experiment=EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_runs(mlflow_client, EXPERIMENT)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 32-px PNGs and the same pixels as the float32 batch the MLflow model takes (0-255)."""
    folder = tmp_path_factory.mktemp("images")
    pixels = write_shape_images(folder, ["circle", "square", "triangle", "circle"])
    return folder, np.stack(pixels).astype(np.float32)


def finetune_probabilities(cli, model: str, folder, out) -> np.ndarray:
    result = cli("predict", f"model={model}", f"images={folder}", f"predict.output={out}", experiment=EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: os.path.basename(r["path"]))
    return np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])


@pytest.fixture(scope="module")
def registered(sweep, cli, mlflow_client):
    """`finetune compare ... compare.register=shapes_head`: (its result, the version the alias names)."""
    parents, _ = sweep
    result = cli("compare", f"compare.sweep={parents[0].info.run_id}", "compare.register=shapes_head",
                 experiment=EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, mlflow_client.get_model_version_by_alias("shapes_head", "champion")


@pytest.fixture(scope="module")
def single_run(cli, mlflow_client):
    result = cli("train", *TINY, *TINY_SHAPES, "freeze=all", "tracking.run_name=alone", experiment=EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = [r for r in runs_of(mlflow_client, EXPERIMENT) if r.info.run_name == "alone"]
    return run.info.run_id, printed_model_file(result.stdout).parents[1]


def has_mlflow_model(client, run_id: str) -> bool:
    return any(a.path == "mlflow_model/MLmodel" for a in client.list_artifacts(run_id, "mlflow_model"))


def test_a_run_logs_its_mlflow_model_with_a_signature_and_pinned_requirements(single_run, mlflow_client):
    from mlflow.models import Model

    single_run, output = single_run
    folder = mlflow_client.download_artifacts(single_run, "mlflow_model")
    meta = Model.load(folder)
    inputs, outputs = meta.signature.inputs.to_dict(), meta.signature.outputs.to_dict()
    assert list(inputs[0]["tensor-spec"]["shape"]) == [-1, 32, 32, 3] and inputs[0]["name"] == "image", inputs
    assert list(outputs[0]["tensor-spec"]["shape"]) == [-1, 3] and outputs[0]["name"] == "probabilities", outputs
    assert set(meta.flavors) == {"keras", "python_function"}
    requirements = open(os.path.join(folder, "requirements.txt")).read().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "keras", "tensorflow"}, requirements
    # the file inside is the very one finetune saved (copied, not saved again), its label map beside it
    assert open(os.path.join(folder, "data", "model.keras"), "rb").read() == open(
        mlflow_client.download_artifacts(single_run, "model/model.keras"), "rb").read()
    assert json.load(open(os.path.join(folder, "data", "label_map.json")))["class_names"] == CLASSES
    # and the run's output folder holds that file once on disk: the MLflow model links finetune's model.keras
    assert (output / "mlflow_model" / "data" / "model.keras").stat().st_ino == (
        output / "model" / "model.keras").stat().st_ino


def test_compare_registers_the_best_sweep_job_with_an_alias(sweep, registered, mlflow_client):
    _, children = sweep
    result, version = registered
    best = max(children, key=lambda c: c.data.metrics["final_val_accuracy"])
    assert version.run_id in {c.info.run_id for c in children}
    assert mlflow_client.get_run(version.run_id).data.metrics["final_val_accuracy"] == \
        best.data.metrics["final_val_accuracy"]
    assert version.source.endswith("/mlflow_model")
    assert "model=models:/shapes_head@champion" in result.stdout
    # a sweep's jobs leave the MLflow model to this moment: only the registered one has it
    assert [has_mlflow_model(mlflow_client, c.info.run_id) for c in children].count(True) == 1
    assert has_mlflow_model(mlflow_client, version.run_id)


def test_pyfunc_serve_and_the_alias_agree_with_finetune_predict(single_run, registered, cli, images, store, tmp_path):
    single_run, _ = single_run
    import mlflow

    folder, batch = images
    expected = finetune_probabilities(cli, single_run, folder, tmp_path / "predict.csv")
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model(f"runs:/{single_run}/mlflow_model")
    assert np.abs(np.asarray(loaded.predict(batch)) - expected).max() < 1e-5

    champion = finetune_probabilities(cli, "models:/shapes_head@champion", folder, tmp_path / "alias.csv")
    by_run = finetune_probabilities(cli, registered[1].run_id, folder, tmp_path / "run.csv")
    assert np.abs(champion - by_run).max() < 1e-6
    served = serve_and_post("models:/shapes_head@champion", {"inputs": batch.tolist()}, store, tmp_path)
    assert np.abs(np.asarray(served["predictions"]) - champion).max() < 1e-5


def serve_and_post(model_uri: str, body: dict, store, cwd) -> dict:
    """`mlflow models serve --env-manager local` on a free loopback port; the answer to one request."""
    port = free_port()
    # the scoring server is `uvicorn` from this environment's bin folder, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return post_when_up(port, body, server)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def post_when_up(port: int, body: dict, server, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # it answered, with an error
            raise AssertionError(f"mlflow models serve: HTTP {error.code}: {error.read()[:3000]}") from None
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                output = server.stdout.read() if server.poll() is not None else "(still running)"
                raise AssertionError(f"mlflow models serve did not answer: {output[-3000:]}") from None
            time.sleep(1)
