"""Shared fixtures: run the real CLI in a subprocess against one MLflow store per test session."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model small enough to train in seconds on 2 CPU cores, on a few dozen generated images.
TINY = ["backbone=mobilenet_v2", "backbone.weights=null", "backbone.input_shape=[32,32]",
        "trainer.epochs=1", "trainer.batch_size=16", "trainer.verbose=0"]
TINY_SHAPES = ["data=shapes", "data.num_per_class=8", "data.image_size=32",
               "data.classes=[circle,square,triangle]"]


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """Working directory holding this session's MLflow store (sqlite) and run outputs."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cli(store, cache_dir):
    """cli(*args, experiment=...) -> CompletedProcess of `python -m finetune ...` in the store dir."""

    def run(*args, experiment: str | None = None, timeout: int = 600, env: dict | None = None):
        return subprocess.run(cli_command(args, experiment), cwd=store, env=cli_env(cache_dir, env),
                              capture_output=True, text=True, timeout=timeout)

    return run


def cli_command(args, experiment: str | None = None) -> list[str]:
    extra = [f"tracking.experiment={experiment}"] if experiment else []
    return [sys.executable, "-m", "finetune", *args, *extra]


def cli_env(cache_dir, env: dict | None = None) -> dict:
    full_env = {**os.environ, "FINETUNE_CACHE_DIR": str(cache_dir), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return full_env


@pytest.fixture(scope="session")
def mlflow_client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def runs_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id])


def sweep_runs(client, experiment: str):
    """(parent runs, child runs) of the sweeps in an experiment."""
    runs = runs_of(client, experiment)
    parents = [r for r in runs if r.data.tags.get("finetune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("finetune.sweep") == "child"]
    return parents, children


@pytest.fixture(scope="session")
def trained_model(cli, mlflow_client):
    """A tiny model trained once per session through the real CLI, for predict/evaluate/export tests.

    Returns {"run_id", "model_dir" (local folder with model.keras, label_map.json, config.yaml),
    "classes", "overrides" (the data overrides it was trained with)}."""
    data = ["data=shapes", "data.num_per_class=8", "data.image_size=32", "data.classes=[circle,square,triangle]"]
    result = cli("train", *TINY, *data, "freeze=none", "trainer.epochs=2", "tracking.register_model=fixture-model",
                 experiment="fixture_trained_model")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "fixture_trained_model")
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("model "))
    model_dir = Path(line.split(None, 1)[1].strip()).parent
    return {"run_id": run.info.run_id, "model_dir": model_dir, "classes": ["circle", "square", "triangle"],
            "overrides": data, "registered": "models:/fixture-model/1"}


def one_error_line(result) -> str:
    """The single `error: ...` line of a CLI call that must fail with exit 2 and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# The longest test files first: pytest-xdist (--dist loadfile) hands out files in collection order, so
# long files collected last (alphabetical order) would leave one worker busy alone at the end.
LONGEST_FIRST = ["test_sweep.py", "test_optuna_sweep.py", "test_trained_model_commands.py", "test_transfer_demo.py",
                 "test_train_cli.py", "test_resume.py", "test_tracking_outage.py", "test_feature_cache.py",
                 "test_bench_smoke.py", "test_bad_data.py", "test_bad_inputs.py", "test_compute.py",
                 "test_mlflow_ui.py", "test_classify_extract.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
    unmarked = [item.nodeid for item in items if "cli" in item.fixturenames and not _is_slow(item)]
    if unmarked:
        raise pytest.UsageError("these tests use the `cli` fixture (directly or through a fixture) but are not "
                                "marked slow: " + ", ".join(unmarked))


# -- the fast tier (-m "not slow") runs no CLI ------------------------------------------------------------
# Every test that runs the CLI is marked slow. Two guards keep it so: the collection check above (tests that
# use the `cli` fixture, even through another fixture), and this audit hook for everything else (cli_command
# with Popen, scripts/*): while a test that is not marked slow runs, starting the CLI in a subprocess raises.
_current: list = []


def _is_slow(item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current.append(item)
    try:
        yield
    finally:
        _current.remove(item)


def runs_the_cli(argv) -> bool:
    """Whether a subprocess's argv starts finetune's CLI: `-m finetune[.x]`, the `finetune` script, or scripts/*."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        text = os.fsdecode(argv)
        try:
            words = shlex.split(text)
        except ValueError:  # unbalanced quotes
            words = text.split()
    else:
        words = [os.fsdecode(a) for a in argv]
    if not words or Path(words[0]).name == "finetune":
        return bool(words)
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1].split(".")[0] == "finetune":
            return True
        if word == "-c" and i + 1 < len(words) and "finetune.cli" in words[i + 1]:  # main() called in a script
            return True
        if Path(word).parent.name == "scripts" and Path(word).suffix in (".py", ".sh") and "=" not in word:
            return True
        if " " in word and runs_the_cli(word):  # sh -c "finetune train ..."
            return True
    return False


def _audit(event, args):
    if event == "subprocess.Popen" and _current and not _is_slow(_current[-1]) and runs_the_cli(args[1]):
        raise RuntimeError(f"{_current[-1].nodeid} runs the finetune CLI in a subprocess ({args[1]!r}) but is "
                           "not marked slow: mark it @pytest.mark.slow (the fast tier, -m 'not slow', runs no CLI)")


sys.addaudithook(_audit)
