"""The fast tier (`-m "not slow"`) runs no CLI: the guard in conftest refuses one in a test not marked slow."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, runs_the_cli


@pytest.mark.parametrize("argv, expected", [
    ([sys.executable, "-m", "finetune", "train"], True),
    ([sys.executable, "-m", "finetune.tracking.outage", "journal.jsonl"], True),
    (["/venv/bin/finetune", "evaluate", "model=x"], True),
    (["bash", str(REPO / "scripts" / "quickstart.sh")], True),
    ([sys.executable, "scripts/transfer_demo.py", "--quick"], True),
    (["/bin/sh", "-c", "finetune train trainer.epochs=1"], True),
    ([sys.executable, "-c", "import sys; from finetune.cli import main; main(sys.argv[1:])", "train"], True),
    ([sys.executable, "-c", "import finetune.model.backbones"], False),
    ([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "sqlite:///finetune/mlflow.db"], False),
    ([sys.executable, "-m", "build", "--wheel", "--outdir", "/tmp/finetune"], False),
    ("mlflow ui --host 127.0.0.1 'unbalanced", False),
])
def test_what_counts_as_running_the_cli(argv, expected):
    assert runs_the_cli(argv) is expected


def test_a_test_not_marked_slow_cannot_start_the_cli(tmp_path):
    # refused before the process starts, so this costs nothing
    with pytest.raises(RuntimeError, match="not marked slow"):
        subprocess.run([sys.executable, "-m", "finetune", "--help"], cwd=tmp_path, capture_output=True)
    # other subprocesses still run
    done = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True, check=True)
    assert done.stdout == "ok\n"


@pytest.mark.slow
def test_a_slow_test_may_start_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "finetune", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def test_a_test_using_the_cli_fixture_must_be_marked_slow(tmp_path):
    """Caught at collection, also through another fixture, so `-m "not slow"` cannot even select one."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (tmp_path / "test_unmarked.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def model(cli):\n"
        "    return cli\n\n"
        "def test_uses_cli_through_a_fixture(model):\n"
        "    pass\n\n"
        "@pytest.mark.slow\n"
        "def test_marked(cli):\n"
        "    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--collect-only", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0, done.stdout
    output = done.stdout + done.stderr
    assert "not marked slow: test_unmarked.py::test_uses_cli_through_a_fixture" in output, output
    assert "test_marked" not in output.split("not marked slow:")[1], output
