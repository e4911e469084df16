"""Shared fixtures: run the real CLI in a subprocess against one MLflow store per test session."""
from __future__ import annotations

import json
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
def warm_cli(tmp_path_factory, cache_dir):
    """This worker's warm interpreter (tests/warm_cli.py), started on first use."""
    warm = WarmCli(tmp_path_factory.mktemp("warm_cli"), cli_env(cache_dir))
    yield warm
    warm.close()


@pytest.fixture(scope="session")
def cli(store, cache_dir, warm_cli):
    """cli(*args, experiment=...) -> CompletedProcess of `python -m finetune ...` in the store dir."""

    def run(*args, experiment: str | None = None, timeout: int = 600, env: dict | None = None, cwd=None):
        return warm_cli.run(list(args), experiment, cwd=cwd or store, env=cli_env(cache_dir, env), timeout=timeout)

    return run


@pytest.fixture(scope="session")
def start_cli(cache_dir, warm_cli):
    """start_cli(args, cwd, experiment=..., env=..., new_session=...) -> a running `python -m finetune ...`
    with Popen's poll/wait/communicate/send_signal/pid (stdout and stderr captured as text)."""

    def start(args, cwd, experiment: str | None = None, env: dict | None = None, new_session: bool = False):
        return warm_cli.start(list(args), experiment, cwd=cwd, env=cli_env(cache_dir, env), new_session=new_session)

    return start


class WarmCli:
    """`python -m finetune <args>` as a child forked from a warm interpreter (tests/warm_cli.py), which has
    imported TensorFlow, Keras and MLflow once; a fresh interpreter where the environment differs in what
    is read at import time. One child at a time (the server waits for each)."""

    # read when a command runs (MLflow reads the login at each request), not when a module is imported
    CALL_TIME_KEYS = {"FINETUNE_CACHE_DIR", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.server, self.calls, self.pending = folder, env, None, 0, b""

    def serves(self, env: dict) -> bool:
        keys = {k for k in set(env) | set(self.env) if k not in self.CALL_TIME_KEYS and not k.startswith("PYTEST_")}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def start(self, args: list[str], experiment, cwd, env: dict, new_session: bool = False, script=None):
        """`python -m finetune <args>`, or `python <script> <args>` given a script."""
        command = [sys.executable, str(script), *args] if script else cli_command(args, experiment)
        if not self.serves(env):
            return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=new_session)
        if self.server is None or self.server.poll() is not None:
            self._start_server()
        self.calls += 1
        out, err = self.folder / f"{self.calls}.out", self.folder / f"{self.calls}.err"
        request = {"argv": command[2 if script else 3:], "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err), "new_session": new_session, "script": str(script) if script else None}
        self.server.stdin.write(json.dumps(request) + "\n")
        return WarmProcess(self, command, self._reply(60)["pid"], out, err)

    def run(self, args: list[str], experiment, cwd, env: dict, timeout: int) -> subprocess.CompletedProcess:
        process = self.start(args, experiment, cwd, env)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def _start_server(self) -> None:
        log = self.folder / "warm_cli.log"
        self.pending = b""
        self.server = subprocess.Popen([sys.executable, str(REPO / "tests" / "warm_cli.py")], cwd=self.folder,
                                       env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=log.open("ab"), text=True, bufsize=1)
        assert "ready" in self._reply(300), log.read_text()[-3000:]

    def _reply(self, timeout: float | None) -> dict:
        """The next line from the server, read straight from its pipe (no buffer hides a line from select)."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([self.server.stdout], [], [], left)[0]:
                raise subprocess.TimeoutExpired("warm_cli", timeout)
            chunk = os.read(self.server.stdout.fileno(), 65536)
            assert chunk, "tests/warm_cli.py ended: " + (self.folder / "warm_cli.log").read_text()[-3000:]
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def has_reply(self) -> bool:
        import select

        return b"\n" in self.pending or bool(select.select([self.server.stdout], [], [], 0)[0])

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


class WarmProcess:
    """A child of tests/warm_cli.py, with the parts of Popen's interface the tests use."""

    def __init__(self, warm: WarmCli, args: list[str], pid: int, out: Path, err: Path):
        self.warm, self.args, self.pid, self.out, self.err, self.returncode = warm, args, pid, out, err, None

    def poll(self):
        if self.returncode is None and self.warm.has_reply():
            self.returncode = self.warm._reply(None)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.warm._reply(timeout)["returncode"]
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)


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
    # MobileNetV2 trained whole, BatchNorm included: a frozen random backbone (VGG16 or MobileNetV2) gives
    # near-constant predictions, which the predict/export agreement checks cannot tell from a broken model
    result = cli("train", *TINY, *data, "freeze=none", "trainer.epochs=2", "tracking.register_model=fixture-model",
                 experiment="fixture_trained_model")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "fixture_trained_model")
    model_dir = printed_model_file(result.stdout).parent
    return {"run_id": run.info.run_id, "model_dir": model_dir, "classes": ["circle", "square", "triangle"],
            "overrides": data, "registered": "models:/fixture-model/1"}


def write_shape_images(folder: Path, kinds: list[str]) -> list:
    """One 32-px PNG per kind in `folder` (`<i>_<kind>.png`); returns their pixels (uint8 HxWx3)."""
    from PIL import Image

    from finetune.data.shapes import render

    folder.mkdir(parents=True, exist_ok=True)
    pixels = [render(kind, 100 + i, 32, 5) for i, kind in enumerate(kinds)]
    for i, (kind, image) in enumerate(zip(kinds, pixels)):
        Image.fromarray(image).save(folder / f"{i}_{kind}.png")
    return pixels


def printed_model_file(stdout: str) -> Path:
    """The model.keras path a train run's summary prints on its `model <path>` line."""
    line = next(line for line in stdout.splitlines() if line.strip().startswith("model "))
    return Path(line.split(None, 1)[1].strip())


ARTIFACTS = {"config.yaml", "overrides.yaml", "label_map.json", "confusion_matrix.png",
             "confusion_matrix.csv", "training_curves.png", "metrics.json"}


def artifact_paths(client, run_id, path=""):
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def assert_recorded(client, run, *, epochs, classes):
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key in ("backbone", "weights_source", "input_shape", "params_total", "stage1.params_trainable",
                "stage1.params_frozen", "dataset", "train_size", "val_size", "num_classes",
                "class_names", "trainer.batch_size", "backbone.name", "freeze.name"):
        assert key in params, key
    assert params["num_classes"] == str(len(classes))
    assert params["class_names"] == ",".join(classes)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "stage"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(epochs)), key
    assert "final_val_accuracy" in run.data.metrics
    paths = artifact_paths(client, run.info.run_id)
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert ARTIFACTS <= names, ARTIFACTS - names
    assert "model/model.keras" in paths
    assert any(p.startswith("freeze_plan/") for p in paths)
    return paths


def one_error_line(result) -> str:
    """The single `error: ...` line of a CLI call that must fail with exit 2 and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# The longest test files first: pytest-xdist (--dist loadfile) hands out files in collection order, so
# long files collected last (alphabetical order) would leave one worker busy alone at the end.
LONGEST_FIRST = ["test_team_server.py", "test_distribute.py", "test_gpu_check.py", "test_train_cli.py", "test_recipe_cli.py", "test_hub.py", "test_sweep.py",
                 "test_transfer_demo.py",
                 "test_tracking_outage.py", "test_recipe_bench.py",
                 "test_trained_model_commands.py", "test_resume.py", "test_classify_extract.py", "test_bench_smoke.py",
                 "test_optuna_sweep.py", "test_cli_output.py", "test_backbones.py", "test_mlflow_ui.py",
                 "test_feature_cache.py", "test_portable_model.py", "test_config.py", "test_freeze.py",
                 "test_compute.py", "test_bad_inputs.py", "test_bad_data.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
    unmarked = [item.nodeid for item in items if {"cli", "warm_cli"} & set(item.fixturenames) and not _is_slow(item)]
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
