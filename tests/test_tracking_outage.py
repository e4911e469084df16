"""Tracking outages stop no command: the journal and breaker alone (fast, no TF, no server); the run scope
every command opens (FAILED, KILLED, one tag scheme; a local store); then a real `mlflow server` killed in
the middle of a real `finetune train`, `finetune extract` and `finetune evaluate`, restarted for the replay."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from finetune.tracking import journal as tracking_journal
from finetune.tracking import outage
from finetune.tracking.journal import JOURNAL_NAME, Journal, replay
from finetune.tracking.journal import describe as journal_describe
from finetune.tracking.outage import Session, bounded_http

from .conftest import TINY, TINY_SHAPES, cli_env, printed_model_file


class FakeClient:
    """The MlflowClient calls a Session makes; `up=False` fails them like a dead server does."""

    def __init__(self):
        self.up, self.calls = True, 0
        self.metrics, self.params, self.tags, self.artifacts, self.ended = [], {}, {}, [], None

    def _call(self):
        self.calls += 1
        if not self.up:
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed "
                                  "with exception HTTPConnectionPool: Connection refused")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._call()
        for p in params:
            if p.key in self.params and self.params[p.key] != p.value:
                raise MlflowException("Changing param values is not allowed", error_code=1000)
        self.metrics += [(m.key, m.value, m.step, m.timestamp) for m in metrics]
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, local, artifact_path=None):
        self._call()
        self.artifacts.append((Path(local).name, artifact_path))

    log_artifacts = log_artifact

    def set_terminated(self, run_id, status, end_time=None):
        self._call()
        self.ended = (status, end_time)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def session(tmp_path, client, clock):
    journal = Journal(tmp_path / JOURNAL_NAME, {"tracking_uri": "http://127.0.0.1:1", "run_id": "run1"})
    return Session("run1", "http://127.0.0.1:1", journal, client=client,
                   ender=lambda status: client.set_terminated("run1", status), clock=clock)


def test_outage_is_journaled_breaker_skips_the_network_and_replay_keeps_steps(tmp_path, capsys):
    client, clock = FakeClient(), Clock()
    s = session(tmp_path, client, clock)
    s.log_params({"lr": 0.1})
    s.log_metrics({"loss": 1.0}, step=0)
    assert client.metrics[0][:3] == ("loss", 1.0, 0) and not s.journal.path.exists()

    client.up = False
    s.log_metrics({"loss": 0.9}, step=1)  # fails once: journaled, breaker opens
    calls = client.calls
    for step in range(2, 6):  # within the cooldown: no network call at all
        clock.t += 1
        s.log_metrics({"loss": 1.0 - step / 10}, step=step)
    s.set_tags({"stage1": "train"})
    assert client.calls == calls
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and str(s.journal.path) in err
    assert len(s.journal.pending()) == 6

    clock.t += outage.FIRST_COOLDOWN_S  # half-open, still down: cooldown doubles
    s.log_metrics({"loss": 0.3}, step=6)
    assert s.cooldown == 2 * outage.FIRST_COOLDOWN_S and len(s.journal.pending()) == 7

    client.up = True
    clock.t += s.cooldown
    s.log_metrics({"loss": 0.2}, step=7)  # replays the 7 journaled calls in order, then logs directly
    assert "is back: 7 journaled call(s) replayed" in capsys.readouterr().err
    assert [m[2] for m in client.metrics if m[0] == "loss"] == list(range(8))
    stamps = [m[3] for m in client.metrics]
    assert stamps == sorted(stamps)  # each value kept the time it was logged at, not the replay's
    assert client.tags == {"stage1": "train"} and not s.journal.pending()
    assert s.end("FINISHED") is not None and client.ended[0] == "FINISHED"  # summary: it was down once
    assert Journal(s.journal.path).pending() == []  # what was sent is recorded as sent


def test_held_metrics_go_in_one_call_before_anything_else_and_an_outage_journals_them(tmp_path, capsys):
    """A run's session holds metrics up to hold_s: fast epochs' metrics and learning-rate series go together."""
    client, clock = FakeClient(), Clock()
    journal = Journal(tmp_path / JOURNAL_NAME, {"tracking_uri": "http://127.0.0.1:1", "run_id": "run1"})
    s = Session("run1", "http://127.0.0.1:1", journal, client=client, clock=clock, hold_s=1.0,
                ender=lambda status: client.set_terminated("run1", status))
    for step in range(3):  # three fast epochs: nothing sent yet
        clock.t += 0.2
        s.log_metrics({"loss": 1.0 - step / 10, "accuracy": step / 10}, step=step)
        s.log_series("lr", [(2 * step, 0.1), (2 * step + 1, 0.1)])
    assert client.calls == 0
    s.set_tags({"stage1": "train"})  # anything else sends what is held first, in one log_batch
    assert client.calls == 2 and [m[2] for m in client.metrics if m[0] == "loss"] == [0, 1, 2]
    assert [m[2] for m in client.metrics if m[0] == "lr"] == list(range(6)) and client.tags == {"stage1": "train"}

    clock.t += 5  # a slow epoch's metrics go at once
    s.log_metrics({"loss": 0.5}, step=3)
    assert client.calls == 3
    client.up = False
    clock.t += 0.1
    s.log_metrics({"loss": 0.4}, step=4)  # held; the end sends it, fails, journals it
    assert client.calls == 3
    s.end("FINISHED")
    assert [e["op"] for e in Journal(s.journal.path).pending()] == ["metrics", "end_run"]
    assert "is unreachable" in capsys.readouterr().err
    client.up = True
    replay(s.journal.path, client=client)
    assert [m[2] for m in client.metrics if m[0] == "loss"] == [0, 1, 2, 3, 4] and client.ended[0] == "FINISHED"


def test_a_metric_series_is_one_call_journaled_whole_and_replayed_with_its_steps(tmp_path, capsys):
    """learning_rate_per_update: an epoch's updates go in one call, and an outage keeps their steps."""
    client, clock = FakeClient(), Clock()
    s = session(tmp_path, client, clock)
    s.log_series("lr", [(0, 0.1), (1, 0.2)])
    assert client.calls == 1 and [m[:3] for m in client.metrics] == [("lr", 0.1, 0), ("lr", 0.2, 1)]
    client.up = False
    s.log_series("lr", [(2, 0.3), (3, 0.4), (4, 0.5)])
    assert journal_describe(s.journal.pending()) == "3 metric values"
    client.up = True
    clock.t += outage.FIRST_COOLDOWN_S
    s.log_series("lr", [(5, 0.6)])
    assert [m[2] for m in client.metrics] == list(range(6))
    assert [m[1] for m in client.metrics] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert "1 journaled call(s) replayed" in capsys.readouterr().err


def test_server_down_at_the_end_then_replayed_later_once(tmp_path, capsys):
    client, clock = FakeClient(), Clock()
    s = session(tmp_path, client, clock)
    artifact = tmp_path / "metrics.json"
    artifact.write_text("{}")
    s.log_metrics({"loss": 1.0}, step=0)
    client.up = False
    s.log_metrics({"loss": 0.5}, step=1)
    s.log_params({"backbone": "mobilenet_v2"})
    s.log_artifact(artifact)
    summary = s.end("FINISHED")
    assert "not logged: 1 metric value, 1 param, 1 artifact, the run's end (FINISHED)" in summary
    assert f"python -m finetune.tracking.journal {s.journal.path}" in summary
    assert client.ended is None

    with pytest.raises(MlflowException):  # still down: nothing lost, nothing marked sent
        replay(s.journal.path, client=client)
    assert len(Journal(s.journal.path).pending()) == 4

    client.up = True
    done, left = replay(s.journal.path, client=client)
    assert (done, left) == (4, [])
    assert [m[2] for m in client.metrics] == [0, 1] and client.params == {"backbone": "mobilenet_v2"}
    assert client.artifacts == [("metrics.json", None)] and client.ended[0] == "FINISHED"
    assert replay(s.journal.path, client=client) == (0, [])  # a second replay sends nothing again


def test_rejected_calls_are_raised_not_journaled_and_local_stores_have_no_journal(tmp_path):
    client, clock = FakeClient(), Clock()
    s = session(tmp_path, client, clock)
    s.log_params({"lr": "0.1"})
    with pytest.raises(MlflowException):  # the caller's mistake, not an outage
        s.log_params({"lr": "0.2"})
    assert not s.journal.path.exists()
    local = Session("run1", "sqlite:////tmp/x.db", Journal(tmp_path / "j.jsonl"))
    assert not local.remote and not outage.is_remote("/tmp/mlruns")


@pytest.mark.parametrize("code,words", [("UNAUTHENTICATED", "refused the login of user 'ann'"),
                                        ("PERMISSION_DENIED", "refused user 'ann' (PERMISSION_DENIED): it needs EDIT")])
def test_a_login_refused_mid_run_is_one_line_not_journaled(tmp_path, monkeypatch, code, words):
    """A password changed or a permission revoked while a run goes on: MLflow answers 401/403, which is the
    server saying no, not the server being away. (The start-up case runs against a real basic-auth server
    in tests/test_team_server.py.)"""
    from finetune.errors import FinetuneError

    class Refusing(FakeClient):
        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            raise MlflowException("API request failed with error code 401", error_code=getattr(
                __import__("mlflow.protos.databricks_pb2", fromlist=[code]), code))

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    s = session(tmp_path, Refusing(), Clock())
    with pytest.raises(FinetuneError) as info:
        s.log_params({"lr": "0.1"})
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not s.journal.path.exists() and not outage.is_outage(info.value.__context__ or info.value)


def test_journal_survives_a_torn_line_and_is_picked_up_by_the_next_session(tmp_path):
    client, clock = FakeClient(), Clock()
    client.up = False
    s = session(tmp_path, client, clock)
    s.log_metrics({"loss": 1.0}, step=3)
    with s.journal.path.open("a") as stream:
        stream.write('{"seq": 9, "op": "metr')  # killed mid-write
    again = session(tmp_path, client, clock)  # e.g. a resumed run in the same folder
    assert [e["step"] for e in again.journal.pending()] == [3]
    client.up = True
    again.log_metrics({"loss": 0.5}, step=4)  # the first call replays what the last process kept
    assert [m[2] for m in client.metrics] == [3, 4]
    client.up = False  # killed while the server is away: its end is kept too...
    again.end("KILLED")
    resumed = session(tmp_path, client, clock)  # ...but the run continued in this folder has not ended
    client.up = True
    resumed.log_metrics({"loss": 0.4}, step=5)
    assert client.ended is None and [m[2] for m in client.metrics] == [3, 4, 5]
    lines = [json.loads(line) for line in s.journal.path.read_text().splitlines()[:1]]
    assert lines[0]["tracking_uri"] == "http://127.0.0.1:1" and lines[0]["run_id"] == "run1"


def test_bounded_http_only_while_inside(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with bounded_http(7):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_unreachable_server_before_the_run_is_one_line_in_seconds():
    """Not 4 minutes of MLflow's default retries and a traceback: a couple of retries, then one line."""
    from omegaconf import OmegaConf

    from finetune import tracking
    from finetune.errors import FinetuneError

    cfg = OmegaConf.create({"uri": f"http://127.0.0.1:{free_port()}", "experiment": "x",
                            "artifact_location": None})
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri  # use_experiment sets the process's URI (and its env var)
    start = time.monotonic()
    try:
        with pytest.raises(FinetuneError) as raised:
            tracking.use_experiment(cfg)
    finally:
        mlflow.set_tracking_uri(saved)
    assert time.monotonic() - start < 15
    assert "is unreachable (connection refused); start it" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_replay_command_on_a_missing_journal_is_one_line(tmp_path, capsys):
    assert tracking_journal.main([str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: journal:")


@pytest.mark.parametrize("module", ["finetune.tracking.journal", "finetune.tracking.outage",
                                    "finetune.tracking_buffer"])
def test_replay_command_and_its_earlier_names(module, tmp_path, capsys, monkeypatch):
    """`python -m <module> <journal>`: the documented name and the two that earlier READMEs and summaries printed."""
    import runpy
    import warnings

    journal = Journal(tmp_path / JOURNAL_NAME, {"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    journal.append({"run_id": "r", "op": "tags", "tags": {"a": "b"}})
    monkeypatch.setattr(sys, "argv", [module, str(tmp_path)])
    for name in [m for m in sys.modules if m == "finetune" or m.startswith("finetune.")]:
        monkeypatch.delitem(sys.modules, name)  # as `python -m` finds it: nothing of finetune imported yet
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # runpy's "found in sys.modules ... prior to execution"
        with pytest.raises(SystemExit) as exited:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exited.value.code == 1  # the server is away: one line, the call kept
    err = capsys.readouterr().err
    assert "error: tracking server still unreachable" in err and "0 of 1 call(s) sent" in err, err
    assert len(Journal(tmp_path / JOURNAL_NAME).pending()) == 1
    if module != "finetune.tracking.journal":
        assert "python -m finetune.tracking.journal" in err


# -- the run scope every command opens (a local store) ------------------------------------------------
@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    """(cfg, client) on one sqlite store for this module's scope tests; the process's tracking URI restored."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("scope_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = OmegaConf.create({"tracking": {"uri": uri, "experiment": "scope", "artifact_location": None,
                                         "run_name": None, "tags": {"team": "vision"}}})
    saved = tracking_utils._tracking_uri
    yield cfg, MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(saved)


def scope_tags(tags: dict) -> set[str]:
    """The tags the scope wrote: not MLflow's own (mlflow.*) nor the user's (tracking.tags)."""
    return {k for k in tags if not k.startswith("mlflow.") and k != "team"}


def test_scope_records_through_the_session_and_ends_finished(local_store, tmp_path):
    import mlflow

    from finetune import tracking
    from finetune.tracking.store import RUN_ID_FILE

    cfg, client = local_store
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with tracking.run(cfg, command="classify", output_dir=tmp_path / "out", run_name="named") as run:
        assert mlflow.active_run().info.run_id == run.run_id
        run.log_params({"backbone": "mobilenet_v2", "long": "x" * 7000})
        run.log_artifact(tmp_path / "table.csv", "classify")
        tracking.log_metrics({"loss": 0.5}, step=3)  # what train/ calls: the same run, through its session
    assert mlflow.active_run() is None and run.summary is None
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "named"
    assert got.data.tags["finetune.command"] == "classify" and got.data.tags["team"] == "vision"
    assert got.data.tags["finetune.process_id"] == str(os.getpid())
    assert scope_tags(got.data.tags) == {"finetune.command", "finetune.process_id", "finetune.host"}
    assert got.data.params["backbone"] == "mobilenet_v2" and len(got.data.params["long"]) == 6000
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(3, 0.5)]
    assert [a.path for a in client.list_artifacts(run.run_id, "classify")] == ["classify/table.csv"]
    assert (tmp_path / "out" / RUN_ID_FILE).read_text() == run.run_id


def test_scope_ends_failed_with_the_error_tag(local_store, tmp_path):
    import mlflow

    from finetune import tracking

    cfg, client = local_store
    with pytest.raises(ValueError, match="bad pixel"):
        with tracking.run(cfg, command="extract", output_dir=tmp_path) as run:
            run.log_params({"layer": "block_1"})
            raise ValueError("bad pixel")
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["error"] == "ValueError: bad pixel"
    assert got.data.params["layer"] == "block_1" and mlflow.active_run() is None
    assert scope_tags(got.data.tags) == {"finetune.command", "finetune.process_id", "finetune.host", "error"}


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_scope_ends_killed_on_sigterm_and_ctrl_c(local_store, tmp_path, capsys, stop):
    from finetune import tracking
    from finetune.app.signals import Terminated

    cfg, client = local_store
    error = Terminated() if stop == "sigterm" else KeyboardInterrupt()
    with pytest.raises(type(error)):
        with tracking.run(cfg, command="train", output_dir=tmp_path, continue_hint="run the same command again") as run:
            raise error
    got = client.get_run(run.run_id)
    what = "terminated by SIGTERM" if stop == "sigterm" else "interrupted (Ctrl-C)"
    assert got.info.status == "KILLED" and got.data.tags["error"] == f"{what}; run the same command again"
    line = f"finetune train: {what}. The run {run.run_id} ended KILLED; run the same command again."
    assert line in capsys.readouterr().err and error.run_ended  # said once: the CLI does not say it again


def test_scope_resumes_a_run_and_adds_to_another_without_touching_its_status(local_store, tmp_path):
    from finetune import tracking

    cfg, client = local_store
    with tracking.run(cfg, command="train", output_dir=tmp_path / "train") as trained:
        trained.log_metrics({"loss": 1.0}, step=0)
    with tracking.run(cfg, command="train", output_dir=tmp_path / "train", resume_run_id=trained.run_id) as resumed:
        resumed.log_metrics({"loss": 0.5}, step=1)
    assert resumed.run_id == trained.run_id
    assert [m.step for m in client.get_metric_history(trained.run_id, "loss")] == [0, 1]
    before = client.get_run(trained.run_id)

    with pytest.raises(RuntimeError):  # evaluate adding to the model's run fails: its status stays
        with tracking.run(cfg, command="evaluate", output_dir=tmp_path / "eval", add_to_run_id=trained.run_id) as run:
            run.log_metrics({"eval_test_accuracy": 0.9})
            raise RuntimeError("disk full")
    after = client.get_run(trained.run_id)
    assert run.run_id == trained.run_id and not run.owned
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags["evaluate.error"] == "RuntimeError: disk full" and "error" not in after.data.tags
    assert after.data.tags["finetune.command"] == "train" and after.data.metrics["eval_test_accuracy"] == 0.9


# -- a real server -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, root: Path) -> subprocess.Popen:
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = (root / "server.log").open("a")
    server = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=cli_env(root, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}))  # no job-runner processes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.2)
    stop_server(server)
    raise AssertionError("mlflow server did not start in 120 s")


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker: only what we started
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


class Server:
    """One `mlflow server` (sqlite store, local artifacts) on a fixed port, killed and restarted by the tests
    below; it stays up between them (each start costs ~7 s here), each test using its own runs."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None

    def start(self) -> "Server":
        if self.process is None or self.process.poll() is not None:
            self.process = start_server(self.port, self.root)
        return self

    def kill(self) -> None:
        if self.process is not None:
            stop_server(self.process)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.kill()


def logged_steps(port: int, run_id: str, key: str) -> list[int]:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"
    with urllib.request.urlopen(url, timeout=2) as response:
        return [m["step"] for m in json.loads(response.read()).get("metrics", [])]


@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_at_full_speed_and_replay_delivers(tmp_path, start_cli,
                                                                                  mlflow_server):
    from mlflow import MlflowClient

    server = mlflow_server.start()
    port, out = server.port, tmp_path / "out"
    epochs = 4
    command = ["train", *TINY, "backbone=vgg16", *TINY_SHAPES, "freeze=none", f"trainer.epochs={epochs}",
               "trainer.batch_size=8", "trainer.steps_per_epoch=3",  # epoch 0 (tracing) takes seconds
               f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={out}"]
    started = time.monotonic()
    train = start_cli(command, tmp_path, "outage")
    run_id, killed_at = None, None
    while train.poll() is None and killed_at is None:  # kill the server once epoch 0 is on it
        time.sleep(0.1)
        if run_id is None and (out / "mlflow_run_id").exists():
            run_id = (out / "mlflow_run_id").read_text().strip() or None
        if run_id and logged_steps(port, run_id, "loss"):
            server.kill()
            killed_at = time.monotonic()
    stdout, stderr = train.communicate(timeout=600)
    finished = time.monotonic()
    assert train.returncode == 0, stderr[-3000:]
    assert killed_at is not None, "training ended before its first epoch reached the server"

    # the outage cost training (almost) nothing: MLflow's default client would block ~4 minutes
    # at the first call after the kill (7 retries with backoff) and then raise
    summary = next(line for line in stderr.splitlines() if "unreachable at the end of the run" in line)
    blocked = float(summary.split("(")[1].split(" s spent")[0])
    assert blocked < 5, summary
    assert finished - killed_at < 120, (finished - killed_at, stderr[-2000:])
    assert stderr.count("is unreachable (") == 1  # one loud warning, not one per call
    journal = out / JOURNAL_NAME
    assert f"python -m finetune.tracking.journal {journal}" in summary
    assert "the run's end (FINISHED)" in summary

    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    journaled_epochs = {e["step"] for e in kept if e.get("op") == "metrics" and "val_loss" in e["metrics"]}
    assert journaled_epochs and max(journaled_epochs) == epochs - 1, journaled_epochs  # the outage hit training

    server.start()  # same store, same port
    assert tracking_journal.main([str(journal)]) == 0
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "stage"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(epochs)), (key, history)
    stamps = [m.timestamp for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
    assert stamps == sorted(stamps) and stamps[-1] <= run.info.end_time  # original times, not replay's
    # epochs after the kill took about as long as each other: none waited on the dead server (one call
    # with MLflow's default client blocks 247 s; the slack is for a loaded 2-core machine)
    gaps = [(b - a) / 1000 for a, b in zip(stamps[1:], stamps[2:])]  # epoch 0 also traces the graph
    assert max(gaps) <= 3 * min(gaps) + 20, gaps
    assert "test_accuracy" in run.data.metrics and run.data.params["backbone"] == "vgg16"
    assert {"model", "metrics.json", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
    print(f"training {finished - started:.1f} s, {finished - killed_at:.1f} s after the kill; "
          f"{blocked:.1f} s in failed calls; epoch gaps {gaps} s; journaled epochs {sorted(journaled_epochs)}",
          file=sys.stderr)


# -- extract and evaluate: every command's run goes through the same scope --------------------------------
def run_through_an_outage(start_cli, args: list[str], server: Server, out: Path, cwd: Path) -> dict:
    """`finetune <args>` against the server, killed as soon as the command's run exists on it (the run id
    file), so that everything the command logs meets a dead server. Returns what it took."""
    started = time.monotonic()
    process = start_cli([*args, f"tracking.uri=http://127.0.0.1:{server.port}", f"hydra.run.dir={out}"], cwd,
                        "outage")
    while process.poll() is None and not (out / "mlflow_run_id").exists():
        time.sleep(0.02)
    server.kill()
    killed_at = time.monotonic()
    stdout, stderr = process.communicate(timeout=600)
    finished = time.monotonic()
    assert process.returncode == 0, stderr[-3000:]
    summary = [line for line in stderr.splitlines() if "unreachable at the end of the run" in line]
    assert summary, f"the command logged nothing while the server was away: {stderr[-2000:]}"
    blocked = float(summary[0].split("(")[1].split(" s spent")[0])
    journal = out / JOURNAL_NAME
    assert f"python -m finetune.tracking.journal {journal}" in summary[0] and "the run's end (FINISHED)" in summary[0]
    assert stderr.count("is unreachable (") == 1  # one loud warning, not one per call
    return {"run_id": (out / "mlflow_run_id").read_text().strip(), "stdout": stdout, "journal": journal,
            "entries": Journal(journal).pending(), "blocked_s": blocked, "after_kill_s": finished - killed_at,
            "total_s": finished - started}


def replayed_without_loss(port: int, outcome: dict):
    """Replay the journal on the restarted server; every param, tag, metric and artifact the command journaled
    is on the server, and the run ended FINISHED. Returns the server's view of the run."""
    from mlflow import MlflowClient

    assert tracking_journal.main([str(outcome["journal"])]) == 0
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    run_id = outcome["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    artifacts = {}
    for entry in outcome["entries"]:
        if entry["op"] == "params":
            assert {k: run.data.params.get(k) for k in entry["params"]} == entry["params"]
        elif entry["op"] == "tags":
            assert {k: run.data.tags.get(k) for k in entry["tags"]} == entry["tags"]
        elif entry["op"] == "metrics":
            for key, value in entry["metrics"].items():
                history = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]
                assert history == [(entry["step"], pytest.approx(value), entry["timestamp"])], key
        elif entry["op"] == "artifact":
            folder = entry["artifact_path"]
            if folder not in artifacts:
                artifacts[folder] = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, folder)}
            local = Path(entry["local_path"])
            assert artifacts[folder].get(local.name) == local.stat().st_size, (local, artifacts[folder])
    return run, client


@pytest.mark.slow
def test_server_killed_during_extract_costs_seconds_and_replay_delivers_everything(tmp_path, start_cli,
                                                                                   mlflow_server):
    server, out = mlflow_server.start(), tmp_path / "out"
    outcome = run_through_an_outage(start_cli, ["extract", "backbone=mobilenet_v2", "backbone.weights=null",
                                                "backbone.input_shape=[32,32]", *TINY_SHAPES], server,
                                    out, tmp_path)
    assert outcome["blocked_s"] < 30, outcome  # MLflow's own client blocks ~247 s at the first call
    assert outcome["after_kill_s"] < 120, outcome
    server.start()
    run, client = replayed_without_loss(server.port, outcome)
    manifest = json.loads((out / "manifest.json").read_text())  # what the command produced
    assert run.data.tags["finetune.command"] == "extract"
    assert run.data.params["backbone"] == manifest["backbone"] == "mobilenet_v2"
    assert int(run.data.params["feature_dim"]) == manifest["feature_dim"]
    assert {int(run.data.params[f"{s}_size"]) for s in manifest["counts"]} == set(manifest["counts"].values())
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "features")}
    assert names == {"manifest.json", manifest["file"], "backbone.weights.h5"}
    print(f"extract: {outcome['total_s']:.1f} s, {outcome['after_kill_s']:.1f} s after the kill, "
          f"{outcome['blocked_s']:.1f} s in failed calls", file=sys.stderr)


@pytest.fixture(scope="module")
def small_model(cli, mlflow_client):
    """A model for evaluate to load: VGG16 frozen, its head on cached features (seconds, not the minute
    the session's trained_model takes); what it predicts does not matter here."""
    result = cli("train", *TINY, "backbone=vgg16", *TINY_SHAPES, experiment="outage_model")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"model": printed_model_file(result.stdout), "overrides": TINY_SHAPES}


@pytest.mark.slow
def test_server_killed_during_evaluate_costs_seconds_and_replay_delivers_everything(tmp_path, start_cli,
                                                                                    small_model, mlflow_server):
    server, out = mlflow_server.start(), tmp_path / "out"
    model = small_model["model"]  # a path: the new run is on the server
    outcome = run_through_an_outage(start_cli, ["evaluate", f"model={model}", *small_model["overrides"],
                                                "evaluate.split=train"], server, out, tmp_path)
    assert outcome["blocked_s"] < 30, outcome
    assert outcome["after_kill_s"] < 120, outcome
    server.start()
    run, client = replayed_without_loss(server.port, outcome)
    produced = json.loads((out / "evaluation" / "train" / "metrics.json").read_text())["metrics"]
    for name in ("loss", "accuracy", "top3_accuracy", "macro_f1"):
        assert run.data.metrics[f"eval_train_{name}"] == pytest.approx(produced[name]), name
    assert run.data.tags["finetune.command"] == "evaluate" and run.data.tags["finetune.model_ref"] == str(model)
    names = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation/train")}
    assert names == {"confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "predictions.csv",
                     "metrics.json"}
    print(f"evaluate: {outcome['total_s']:.1f} s, {outcome['after_kill_s']:.1f} s after the kill, "
          f"{outcome['blocked_s']:.1f} s in failed calls", file=sys.stderr)
