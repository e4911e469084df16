"""Tracking outages do not kill training: the journal and breaker alone (fast, no TF, no server), then
a real `mlflow server` killed in the middle of a real `finetune train` and restarted for the replay."""
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

from finetune.tracking import outage as tracking_buffer
from finetune.tracking.outage import Journal, Session, bounded_http, replay

from .conftest import TINY, TINY_SHAPES, cli_command, cli_env


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


def session(tmp_path, client, clock, capsys=None):
    return Session("run1", "http://127.0.0.1:1", tmp_path / tracking_buffer.JOURNAL_NAME, client=client,
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

    clock.t += tracking_buffer.FIRST_COOLDOWN_S  # half-open, still down: cooldown doubles
    s.log_metrics({"loss": 0.3}, step=6)
    assert s.cooldown == 2 * tracking_buffer.FIRST_COOLDOWN_S and len(s.journal.pending()) == 7

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
    assert f"python -m finetune.tracking.outage {s.journal.path}" in summary
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
    local = Session("run1", "sqlite:////tmp/x.db", tmp_path / "j.jsonl")
    assert not local.remote and not tracking_buffer.is_remote("/tmp/mlruns")


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
    assert tracking_buffer.main([str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: journal:")


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


def logged_steps(port: int, run_id: str, key: str) -> list[int]:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}"
    with urllib.request.urlopen(url, timeout=2) as response:
        return [m["step"] for m in json.loads(response.read()).get("metrics", [])]


@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_at_full_speed_and_replay_delivers(tmp_path, cache_dir):
    from mlflow import MlflowClient

    port, root, out = free_port(), tmp_path / "server", tmp_path / "out"
    root.mkdir()
    epochs = 4
    server = start_server(port, root)
    try:
        command = cli_command(["train", *TINY, *TINY_SHAPES, "freeze=none", f"trainer.epochs={epochs}",
                               "trainer.steps_per_epoch=6", f"tracking.uri=http://127.0.0.1:{port}",
                               "tracking.experiment=outage", f"hydra.run.dir={out}"])
        started = time.monotonic()
        train = subprocess.Popen(command, cwd=tmp_path, env=cli_env(cache_dir), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        run_id, killed_at = None, None
        while train.poll() is None and killed_at is None:  # kill the server once epoch 0 is on it
            time.sleep(0.1)
            if run_id is None and (out / "mlflow_run_id").exists():
                run_id = (out / "mlflow_run_id").read_text().strip() or None
            if run_id and logged_steps(port, run_id, "loss"):
                stop_server(server)
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
        journal = out / tracking_buffer.JOURNAL_NAME
        assert f"python -m finetune.tracking.outage {journal}" in summary
        assert "the run's end (FINISHED)" in summary

        kept = [json.loads(line) for line in journal.read_text().splitlines()]
        journaled_epochs = {e["step"] for e in kept if e.get("op") == "metrics" and "val_loss" in e["metrics"]}
        assert journaled_epochs and max(journaled_epochs) == epochs - 1, journaled_epochs  # the outage hit training

        server = start_server(port, root)  # same store, same port
        assert tracking_buffer.main([str(journal)]) == 0
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
        assert "test_accuracy" in run.data.metrics and run.data.params["backbone"] == "mobilenet_v2"
        assert {"model", "metrics.json", "config.yaml"} <= {a.path for a in client.list_artifacts(run_id)}
        print(f"training {finished - started:.1f} s, {finished - killed_at:.1f} s after the kill; "
              f"{blocked:.1f} s in failed calls; epoch gaps {gaps} s; journaled epochs {sorted(journaled_epochs)}",
              file=sys.stderr)
    finally:
        stop_server(server)
