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

from tests.conftest import REPO, TINY_SHAPES, cli_command, cli_env, one_error_line
from tests.test_sweep import assert_parent_and_children

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "tracking_server.sh"
ADMIN_PASSWORD = "admin-password-for-tests"
USER, PASSWORD = "alice", "alice-password-for-tests"
EXPERIMENT = "team"
CHEAP = ["backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "freeze=all",
         "trainer.epochs=1", "trainer.batch_size=16", "trainer.verbose=0", "tracking.log_model=false", *TINY_SHAPES]


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

    outcome = run_through_an_outage(start_cli, ["train", *CHEAP, f"tracking.experiment={EXPERIMENT}"],
                                    team_server, tmp_path / "out", tmp_path)
    team_server.start()
    run, _ = replayed_without_loss(team_server.port, outcome)
    assert run.data.tags["finetune.command"] == "train"


def test_two_sweep_processes_share_one_optuna_study_on_postgresql(cache_dir, team_server, login, tmp_path):
    """Optuna's distributed mode: two `finetune train -m` processes on one study in PostgreSQL, started
    together (as SLURM array tasks would be). The budget is met exactly, no parameter set runs twice, there
    is one MLflow parent, and the database password is recorded nowhere."""
    import optuna
    from mlflow import MlflowClient

    from tests.conftest import sweep_runs

    secret = (team_server.dir / "pg_password").read_text().strip()
    storage = f"postgresql+psycopg2://mlflow:{secret}@127.0.0.1:{team_server.pg_port}/optuna"
    args = ["train", "-m", "hparams_search=head_optuna", *CHEAP, "hydra.sweeper.n_trials=4",
            "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={storage}", "trainer.isolate_sweep_jobs=false",
            f"tracking.uri={team_server.uri}", f"tracking.experiment={EXPERIMENT}_shared"]
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    # two real interpreters (the warm one forks one command at a time)
    processes = [subprocess.Popen(cli_command(args), cwd=folder, env=cli_env(cache_dir), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for folder in folders]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert secret not in stdout + stderr

    study = optuna.load_study(study_name="shared", storage=storage)
    ran = [t for t in study.trials if not t.user_attrs.get("duplicate_of")]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4
    assert len({tuple(sorted(t.params.items())) for t in ran}) == 4
    assert len({t.user_attrs["sweep_pid"] for t in ran}) == 2  # both processes ran trials

    client = MlflowClient(tracking_uri=team_server.uri)
    parents, children = sweep_runs(client, f"{EXPERIMENT}_shared")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    for run in [*parents, *children]:
        recorded = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert secret not in recorded
    assert "mlflow:***@" in parents[0].data.tags["optuna.study"]
