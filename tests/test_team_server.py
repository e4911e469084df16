"""MLflow for a team: scripts/tracking_server.sh runs PostgreSQL + an MLflow server with basic-auth logins on
127.0.0.1; finetune logs into it, a refused login is one line (not an outage), a parallel sweep lands whole,
and the outage journal replays into it after the server comes back."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, TINY_SHAPES, one_error_line
from tests.test_sweep import assert_parent_and_children

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "tracking_server.sh"
ADMIN_PASSWORD = "admin-password-for-tests"
USER, PASSWORD = "alice", "alice-password-for-tests"
EXPERIMENT = "team"
CHEAP = ["backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "freeze=all",
         "trainer.epochs=1", "trainer.batch_size=16", "trainer.verbose=0", *TINY_SHAPES]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TeamServer:
    """The script's server in a folder of its own (PostgreSQL needs a folder its `postgres` user can reach,
    so not pytest's 0700 tmp tree)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="finetune_team_"))
        os.chmod(self.dir, 0o755)
        self.port, self.pg_port = free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def script(self, *args) -> subprocess.CompletedProcess:
        env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
        return subprocess.run(["bash", str(SCRIPT), *args, "--dir", str(self.dir), "--port", str(self.port),
                               "--pg-port", str(self.pg_port)], env=env, capture_output=True, text=True, timeout=180)

    def start(self) -> "TeamServer":
        result = self.script("start")
        assert result.returncode == 0, result.stdout + result.stderr
        return self

    def kill(self) -> None:  # the MLflow server only: what an outage looks like to the clients
        self.script("stop-server")

    def stop(self) -> None:
        self.script("stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def team_server():
    if not shutil.which("initdb") and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/install_postgres.sh failed?)")
        pytest.skip("PostgreSQL is not installed: scripts/install_postgres.sh")
    server = TeamServer().start()
    added = server.script("add-user", USER, PASSWORD, "--experiment", EXPERIMENT, "--permission", "EDIT")
    assert added.returncode == 0, added.stdout + added.stderr
    yield server
    server.stop()
    assert not server.dir.exists()


@pytest.fixture
def login(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)


def test_the_server_runs_on_postgresql_and_listens_on_loopback_only(team_server):
    config = (team_server.dir / "auth.ini").read_text()
    assert "postgresql+psycopg2://mlflow:" in config and "default_permission = READ" in config
    assert oct((team_server.dir / "auth.ini").stat().st_mode)[-3:] == "600"  # it holds the database password
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
    for port in (team_server.port, team_server.pg_port):
        lines = [line for line in listening.splitlines() if f":{port} " in line]
        assert all("127.0.0.1:" in line for line in lines), lines


@pytest.mark.parametrize("username,password,words", [
    (None, None, "refused a client without a login (UNAUTHENTICATED)"),
    (USER, "not-the-password", f"refused the login of user '{USER}' (UNAUTHENTICATED)"),
])
def test_a_refused_login_is_one_line_not_an_outage(cli, team_server, username, password, words, monkeypatch):
    for key, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    result = cli("train", *CHEAP, f"tracking.uri={team_server.uri}", f"tracking.experiment={EXPERIMENT}")
    line = one_error_line(result)
    assert words in line and "MLFLOW_TRACKING_PASSWORD" in line and "unreachable" not in line


def test_a_parallel_sweep_lands_as_one_parent_and_four_finished_children(cli, team_server, login, tmp_path):
    from mlflow import MlflowClient

    result = cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *CHEAP,
                 "optimizer.lr=1e-3,3e-3,1e-2,3e-2", "trainer.isolate_sweep_jobs=false",
                 f"tracking.uri={team_server.uri}", f"tracking.experiment={EXPERIMENT}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    parent, children = assert_parent_and_children(MlflowClient(tracking_uri=team_server.uri), EXPERIMENT, 4)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert len({c.data.params["optimizer.lr"] for c in children}) == 4


def test_the_outage_journal_replays_into_the_server_after_a_restart(start_cli, team_server, login, tmp_path):
    from tests.test_tracking_outage import replayed_without_loss, run_through_an_outage

    outcome = run_through_an_outage(start_cli, ["train", *CHEAP, f"tracking.experiment={EXPERIMENT}",
                                                "tracking.log_model=false"],  # the journal, not a 59 MB upload
                                    team_server, tmp_path / "out", tmp_path)
    team_server.start()
    run, _ = replayed_without_loss(team_server.port, outcome)
    assert run.data.tags["finetune.command"] == "train"
