"""MLflow: where runs go, flattened params, a per-epoch metric callback, artifacts."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import mlflow

RUN_ID_FILE = "mlflow_run_id"  # a run's id, written into its output dir (for sweepers and scripts)
# MLflow's limits (mlflow.utils.validation): param values 6000 chars, keys 250, 100 params a batch.
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
PARAM_BATCH = 100
# The experiment tag in which MLflow records an experiment's kind (GenAI or model training). MLflow 3.17's UI
# does not pick its view from it (the UI's own "GenAI / Model training" switch does); the links printed by
# ui_hint therefore go straight to the runs table (#/experiments/<id>/runs).
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg_tracking) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working dir."""
    if cfg_tracking.uri:
        return str(cfg_tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(cfg_tracking, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store, absolute; a server decides itself."""
    if cfg_tracking.artifact_location:
        return str(cfg_tracking.artifact_location)
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def use_experiment(cfg_tracking) -> str:
    """Point MLflow at the store and experiment; returns the experiment id.

    A remote server that cannot be reached gets a few seconds (2 retries), then one error line,
    instead of MLflow's default 7 retries with backoff (about 4 minutes) and a traceback."""
    uri = tracking_uri(cfg_tracking)
    mlflow.set_tracking_uri(uri)
    return startup_call(uri, _use_experiment, cfg_tracking, uri)


# MLflow 3's switch for its filesystem store (file:, ./mlruns), which it otherwise refuses with a traceback
FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"


def startup_call(uri: str, function, *args, **kwargs):
    """`function(*args, **kwargs)` before a run's Session exists (finding the experiment, starting the run):
    on a remote server, bounded to 2 retries (~3 s), and an unreachable server is one FinetuneError line."""
    from finetune.errors import FinetuneError
    from finetune.tracking import outage

    if not outage.is_remote(uri):
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if FILE_STORE_SWITCH not in str(error):
                raise
            from finetune.errors import ConfigError

            raise ConfigError("tracking.uri", uri, "a database store such as sqlite:///<folder>/mlflow.db, or a "
                                                   "tracking server: this MLflow refuses its filesystem store (mlruns/)",
                              f"An existing mlruns/ moves over with `mlflow migrate-filestore`; to use it as it is, "
                              f"set {FILE_STORE_SWITCH}=true") from None
    try:
        with outage.bounded_http(retries=outage.STARTUP_RETRIES):
            return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        refusal = outage.refused(uri, error)
        if refusal is not None:
            raise refusal from None
        if not outage.is_outage(error):
            raise
        raise FinetuneError(f"tracking.uri: the tracking server {uri} is unreachable "
                            f"({outage.reason(error)}); start it, or log to a local store "
                            f"(tracking.uri=null: sqlite in the working directory)") from None


def _use_experiment(cfg_tracking, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(cfg_tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:  # recorded as a model-training experiment
        return mlflow.create_experiment(cfg_tracking.experiment, tags={EXPERIMENT_KIND: TRAINING_KIND},
                                        artifact_location=artifact_location(cfg_tracking, uri))
    except MlflowException:  # another job created it a moment ago
        experiment = mlflow.get_experiment_by_name(cfg_tracking.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """{"a.b": "1", ...} from nested dicts/lists, values as strings within MLflow's limits."""
    flat: dict[str, str] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name[:MAX_PARAM_KEY]] = param_value(value)
    return flat


def param_value(value) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."


# What a run logs goes through these: inside a run scope (finetune.tracking.scope), through the run's
# finetune.tracking.outage Session (bounded calls; journaled and replayed while a server is away);
# outside one, straight to MLflow's active run as always.
def _session():
    from finetune.tracking import outage

    return outage.current()


def log_params(params: dict) -> None:
    items = [(k[:MAX_PARAM_KEY], param_value(v)) for k, v in params.items()]
    session = _session()
    for start in range(0, len(items), PARAM_BATCH):
        (session.log_params if session else mlflow.log_params)(dict(items[start:start + PARAM_BATCH]))


def log_metrics(metrics: dict, step: int | None = None) -> None:
    session = _session()
    (session.log_metrics if session else mlflow.log_metrics)(metrics, step=step)


def log_series(key: str, values) -> None:
    """One metric at many steps in one call ([(step, value), ...]): MLflow draws it as one curve."""
    values = list(values)
    if not values:
        return
    session = _session()
    if session:
        session.log_series(key, values)
        return
    active = mlflow.active_run()
    if active is None:  # a callback used outside a tracked run (a test's, a notebook's)
        return
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(active.info.run_id,
                                    metrics=[Metric(key, float(v), timestamp, int(s)) for s, v in values])


def set_tag(key: str, value) -> None:
    set_tags({key: value})


def set_tags(tags: dict) -> None:
    session = _session()
    (session.set_tags if session else mlflow.set_tags)(tags)


def log_artifact(local_path, artifact_path: str | None = None) -> None:
    """A file or a folder (its contents go under artifact_path)."""
    session = _session()
    if session:
        session.log_artifact(local_path, artifact_path)
    elif Path(local_path).is_dir():
        mlflow.log_artifacts(str(local_path), artifact_path)
    else:
        mlflow.log_artifact(str(local_path), artifact_path)


def ui_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at the run: `mlflow ui` on this store, bound to the loopback interface only (the UI has
    no authentication: on 0.0.0.0 anyone on the network could read and delete runs), and the run's page."""
    if uri.lower().startswith(("http://", "https://")):  # a tracking server serves the UI itself
        base = uri.rstrip("/")
        return f"open {base}/#/experiments/{experiment_id}/runs/{run_id} (all runs: {base}/#/experiments/{experiment_id}/runs)"
    store = f" --backend-store-uri {uri}" if uri.startswith("sqlite:") else ""
    return (f"mlflow ui --host 127.0.0.1{store}   then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
            f" (all runs: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs)")


def register_model(name: str, artifact_path: str) -> str | None:
    """Register the active run's `artifact_path` folder as a new version of model `name`; returns it.

    MLflow 3's mlflow.register_model only accepts models logged through a flavor; the client API
    registers any artifact folder, which keeps the plain .keras file as the model format."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    session = _session()
    if session is not None and session.remote:  # journaled (None) while the server is unreachable
        return session.register_model(name, mlflow.get_artifact_uri(artifact_path))
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    run = mlflow.active_run()
    version = client.create_model_version(name, source=mlflow.get_artifact_uri(artifact_path),
                                          run_id=run.info.run_id)
    return version.version


def process_rss_mb() -> float:
    """This process's resident memory in MiB (what grows if jobs in one process leak)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # Linux without psutil
        fields = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()
        return int(fields[0]) / 1024


def metric_key(name: str) -> str:
    """A valid MLflow metric name: alphanumerics, _ - . / and spaces; anything else becomes _."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)
