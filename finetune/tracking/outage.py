"""Tracking that survives a tracking-server outage: bounded calls, a local journal, replay.

With a remote (http/https) tracking URI, every metric, param, tag, artifact and the run's end go
through one `Session`:

- each call to the server is bounded: no retries, `FINETUNE_TRACKING_TIMEOUT` seconds (default 10)
  per request, instead of MLflow's default 7 retries with backoff and a 120 s timeout (about 4 minutes
  of blocking per call before it raises);
- a call that fails because the server is unreachable (or answers 5xx/429) is appended to a JSON-lines
  journal in the run's output folder, one loud warning is printed, and a circuit breaker opens: for
  the next `cooldown` seconds (15 s, doubling up to 5 minutes while the server stays away) calls go
  straight to the journal without touching the network, so training runs at full speed;
- at the first call after the cooldown, the journal is replayed in order (metrics with their original
  step and timestamp) and, if that works, direct logging resumes and a second line says so;
- at the end of the run, what is still pending is replayed once more, the run is ended, and a final
  line says what could not be logged and how to replay it later:
  `python -m finetune.tracking.outage <journal>`. That replay also sets the run's final status.

Local stores (sqlite, file paths) keep MLflow's plain calls: no journal, no extra cost.
The journal is plain JSON (never pickle): a header line, one line per call ({"seq", "op", ...}), and
{"sent": [...]} / {"rejected": seq} / {"superseded": seq} lines recording what became of them. A run that
is continued in the same folder (trainer.resume) replays what its killed process kept, except its end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

JOURNAL_NAME = "tracking_journal.jsonl"
TIMEOUT_ENV = "FINETUNE_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 10
ARTIFACT_TIMEOUT_S = 120  # an upload may legitimately take a while between two socket reads
FIRST_COOLDOWN_S, MAX_COOLDOWN_S = 15.0, 300.0
STARTUP_RETRIES = 2  # finding the experiment before the run: a server restarting gets ~3 s, not 4 minutes
# MLflow's limits per log_batch request
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100
# MLflow error codes that are the caller's fault, not an outage: replaying them later would fail again
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                 "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST"}


def is_remote(uri: str | None) -> bool:
    return bool(uri) and str(uri).lower().startswith(("http://", "https://"))


def is_outage(error: BaseException) -> bool:
    """True for an unreachable/overloaded server; False for a call the server would always reject
    (or a local mistake such as a missing file): those are raised as before, not journaled."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, TypeError, ValueError, KeyError)):
        return False
    return getattr(error, "error_code", None) not in CLIENT_ERRORS


def _timeout_s() -> int:
    try:
        return max(1, int(float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))))
    except ValueError:
        return DEFAULT_TIMEOUT_S


@contextlib.contextmanager
def bounded_http(timeout_s: int | None = None, retries: int = 0):
    """MLflow's REST client reads these at every request: few or no retries, a short timeout, meanwhile."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3 waits 0, 2, 4 ... s between retries
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s or _timeout_s()))}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the journal -------------------------------------------------------------------------------------
class Journal:
    """Append-only JSON lines; created on the first entry. Reopening it picks up what is pending."""

    def __init__(self, path: Path, header: dict | None = None):
        self.path = Path(path)
        self.header = dict(header or {})
        self.entries: dict[int, dict] = {}  # seq -> entry, pending only
        self.next_seq = 0
        self.rejected: list[tuple[dict, str]] = []
        self._torn = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        self._torn = bool(text) and not text.endswith("\n")  # the next record starts on a line of its own
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if "journal" in record:
                self.header = {**record, **{k: v for k, v in self.header.items() if v}}
            elif "seq" in record and "op" in record:
                self.entries[int(record["seq"])] = record
                self.next_seq = max(self.next_seq, int(record["seq"]) + 1)
            elif "sent" in record:
                for seq in record["sent"]:
                    self.entries.pop(int(seq), None)
            elif "superseded" in record:
                self.entries.pop(int(record["superseded"]), None)
            elif "rejected" in record:
                entry = self.entries.pop(int(record["rejected"]), None)
                if entry is not None:
                    self.rejected.append((entry, str(record.get("error", ""))))

    def _write(self, record: dict) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            if self._torn:
                stream.write("\n")
                self._torn = False
            if new:
                stream.write(json.dumps({"journal": "finetune tracking journal", "version": 1,
                                         **self.header}) + "\n")
            stream.write(json.dumps(record) + "\n")
            stream.flush()

    def append(self, entry: dict) -> int:
        record = {"seq": self.next_seq, **entry}
        self.next_seq += 1
        self._write(record)
        self.entries[record["seq"]] = record
        return record["seq"]

    def mark_sent(self, seqs: list[int]) -> None:
        if seqs:
            self._write({"sent": list(seqs)})
            for seq in seqs:
                self.entries.pop(seq, None)

    def mark_rejected(self, seq: int, error: str) -> None:
        self._write({"rejected": seq, "error": error[:500]})
        entry = self.entries.pop(seq, None)
        if entry is not None:
            self.rejected.append((entry, error))

    def mark_superseded(self, seq: int) -> None:
        """Not to be sent any more (a kept end of a run that is now being continued)."""
        self._write({"superseded": seq})
        self.entries.pop(seq, None)

    def pending(self) -> list[dict]:
        return [self.entries[seq] for seq in sorted(self.entries)]


def describe(entries: list[dict]) -> str:
    """'12 metric values, 3 params, 1 tag, 2 artifacts, the run's end (FINISHED)'."""
    counts = {"metric value": 0, "param": 0, "tag": 0, "artifact": 0, "model registration": 0}
    end = None
    for entry in entries:
        op = entry["op"]
        if op == "metrics":
            counts["metric value"] += len(entry["metrics"])
        elif op == "params":
            counts["param"] += len(entry["params"])
        elif op == "tags":
            counts["tag"] += len(entry["tags"])
        elif op == "artifact":
            counts["artifact"] += 1
        elif op == "register_model":
            counts["model registration"] += 1
        elif op == "end_run":
            end = entry["status"]
    parts = [f"{n} {name}{'s' if n != 1 else ''}" for name, n in counts.items() if n]
    if end:
        parts.append(f"the run's end ({end})")
    return ", ".join(parts) or "nothing"


# -- sending one entry ---------------------------------------------------------------------------------
def send(client, entry: dict) -> None:
    """One journal entry to the server through an MlflowClient (raises what the client raises)."""
    from mlflow.entities import Metric, Param, RunTag

    run_id, op = entry["run_id"], entry["op"]
    if op == "metrics":
        items = [Metric(key, _number(value), int(entry["timestamp"]), int(entry.get("step") or 0))
                 for key, value in entry["metrics"].items()]
        for start in range(0, len(items), BATCH_METRICS):
            client.log_batch(run_id, metrics=items[start:start + BATCH_METRICS])
    elif op == "params":
        items = [Param(key, str(value)) for key, value in entry["params"].items()]
        for start in range(0, len(items), BATCH_PARAMS):
            client.log_batch(run_id, params=items[start:start + BATCH_PARAMS])
    elif op == "tags":
        items = [RunTag(key, str(value)) for key, value in entry["tags"].items()]
        for start in range(0, len(items), BATCH_TAGS):
            client.log_batch(run_id, tags=items[start:start + BATCH_TAGS])
    elif op == "artifact":
        local = entry["local_path"]
        if not os.path.exists(local):
            raise FileNotFoundError(f"{local} (an artifact the journal refers to) no longer exists")
        with bounded_http(max(_timeout_s(), ARTIFACT_TIMEOUT_S)):
            if os.path.isdir(local):
                client.log_artifacts(run_id, local, entry.get("artifact_path"))
            else:
                client.log_artifact(run_id, local, entry.get("artifact_path"))
    elif op == "register_model":
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(entry["name"])
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        return client.create_model_version(entry["name"], source=entry["source"], run_id=run_id).version
    elif op == "end_run":
        client.set_terminated(run_id, entry["status"], end_time=int(entry["end_time"]))
    else:
        raise ValueError(f"unknown journal op {op!r}")


def _number(value) -> float:
    return float(value) if value is not None else math.nan


# -- the per-run session -------------------------------------------------------------------------------
class Session:
    """One run's resilient tracking. Remote URIs: bounded calls + breaker + journal. Local: plain MLflow."""

    def __init__(self, run_id: str, uri: str, journal_path: Path, *, client=None, ender=None,
                 first_cooldown: float = FIRST_COOLDOWN_S, max_cooldown: float = MAX_COOLDOWN_S,
                 clock=time.monotonic, stream=None):
        self.run_id, self.uri = run_id, uri
        self.remote = is_remote(uri)
        self.journal = Journal(journal_path, {"tracking_uri": uri, "run_id": run_id})
        self._client = client
        self._ender = ender
        self.first_cooldown, self.max_cooldown = first_cooldown, max_cooldown
        self.cooldown = first_cooldown
        self.open_until: float | None = None  # breaker open until this clock time
        self.clock = clock
        self.stream = stream
        self.blocked_s = 0.0  # time spent in calls that failed (what the outage cost training)
        self.outages = 0
        self.lock = threading.Lock()
        for entry in self.journal.pending():  # this run is being continued (resumed): it has not ended
            if entry["op"] == "end_run" and entry["run_id"] == run_id:
                self.journal.mark_superseded(entry["seq"])
        if self.journal.entries:  # left by an earlier process of this run: replay at the first chance
            self.open_until = clock()

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    # what training calls
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self.remote:
            import mlflow

            mlflow.log_metrics(metrics, step=step)
            return
        self.submit({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()},
                     "step": int(step or 0), "timestamp": now_ms()})

    def log_params(self, params: dict) -> None:
        if not self.remote:
            import mlflow

            mlflow.log_params(params)
            return
        self.submit({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict) -> None:
        if not self.remote:
            import mlflow

            mlflow.set_tags(tags)
            return
        self.submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        if not self.remote:
            import mlflow

            if Path(local_path).is_dir():
                mlflow.log_artifacts(str(local_path), artifact_path)
            else:
                mlflow.log_artifact(str(local_path), artifact_path)
            return
        local = Path(local_path).resolve()
        if not local.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {local}")
        self.submit({"op": "artifact", "local_path": str(local), "artifact_path": artifact_path})

    def register_model(self, name: str, source: str) -> str | None:
        """The new version, or None when the registration was journaled (server unreachable)."""
        return self.submit({"op": "register_model", "name": name, "source": source})

    # the resilient path
    def submit(self, body: dict):
        """Send now (what send returns), or journal it (None) while the server is unreachable."""
        entry = {"run_id": self.run_id, **body}
        with self.lock:
            if self.open_until is not None:
                if self.clock() < self.open_until or not self._replay_pending():
                    self.journal.append(entry)
                    return None
            try:
                return self._timed(send, entry)
            except Exception as error:  # noqa: BLE001 - an outage is journaled, anything else raised
                if not is_outage(error):
                    raise
                self.journal.append(entry)
                self._opened(error)

    def _timed(self, function, *args):
        start = time.perf_counter()
        try:
            with bounded_http():
                return function(self.client, *args)
        except Exception:
            self.blocked_s += time.perf_counter() - start
            raise

    def _opened(self, error: BaseException) -> None:
        """A failure: (re)open the breaker; warn loudly the first time of each outage."""
        if self.open_until is None or not self.outages:  # (or journal left by an earlier process)
            self.outages += 1
            self.cooldown = self.first_cooldown
            self._say(f"WARNING: tracking server {self.uri} is unreachable ({reason(error)}). "
                      f"Training goes on; metrics, params, tags and artifacts are kept in {self.journal.path} "
                      f"and sent when the server is back.")
        else:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        self.open_until = self.clock() + self.cooldown

    def _replay_pending(self) -> bool:
        """Send what is pending, in order. True when nothing is left (the breaker closes)."""
        sent: list[int] = []
        count = len(self.journal.entries)
        try:
            for entry in self.journal.pending():
                try:
                    self._timed(send, entry)
                    sent.append(entry["seq"])
                except Exception as error:  # noqa: BLE001
                    if is_outage(error):
                        raise
                    self.journal.mark_sent(sent)
                    sent = []
                    self.journal.mark_rejected(entry["seq"], one_line(error))
                    self._say(f"WARNING: tracking server rejected a journaled {entry['op']} call: {one_line(error)}")
        except Exception as error:  # noqa: BLE001 - still unreachable
            self.journal.mark_sent(sent)
            self._opened(error)
            return False
        self.journal.mark_sent(sent)
        if self.open_until is not None:
            self._say(f"tracking server {self.uri} is back: {count} journaled call(s) replayed "
                      f"from {self.journal.path}.")
        self.open_until = None
        return True

    def end(self, status: str = "FINISHED") -> str | None:
        """Replay what is pending, end the run (on the server if it is there), say what was lost."""
        import mlflow

        ender = self._ender or mlflow.end_run
        if not self.remote:
            ender(status)
            return None
        with self.lock:
            if self.journal.entries:
                self._replay_pending()
            end_time = now_ms()
            try:
                if self.journal.entries:  # the server is away: don't call it again, just end locally
                    raise ConnectionError("earlier calls still pending")
                self._timed(lambda _client: ender(status))
            except Exception as error:  # noqa: BLE001
                if not is_outage(error):
                    raise
                self.journal.append({"run_id": self.run_id, "op": "end_run", "status": status,
                                     "end_time": end_time})
                with contextlib.suppress(Exception):  # leave no active run behind in this process
                    if mlflow.active_run() and mlflow.active_run().info.run_id == self.run_id:
                        with bounded_http(1):
                            mlflow.end_run(status)
            return self.summary()

    def summary(self) -> str | None:
        pending = self.journal.pending()
        if pending:
            text = (f"WARNING: tracking server {self.uri} unreachable at the end of the run "
                    f"({self.blocked_s:.1f} s spent in failed calls): not logged: {describe(pending)}; "
                    f"run {self.run_id} stays RUNNING there until replayed. Kept in "
                    f"{self.journal.path}; replay with: python -m finetune.tracking.outage {self.journal.path}")
        elif self.outages:
            text = (f"tracking: the server was unreachable {self.outages} time(s) during the run "
                    f"({self.blocked_s:.1f} s spent in failed calls); everything kept in {self.journal.path} "
                    f"was replayed.")
        else:
            return None
        if self.journal.rejected:
            text += f" {len(self.journal.rejected)} call(s) rejected by the server (see the journal)."
        self._say(text)
        return text


def reason(error: BaseException) -> str:
    """Why the server could not be reached, short: 'connection refused', 'timed out', else the error."""
    text = str(error)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"),
                          ("Temporary failure in name resolution", "name resolution failed"),
                          ("Connection reset", "connection reset"), ("Connection aborted", "connection aborted")):
        if needle in text:
            return short
    return one_line(error, 200)


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}"


# -- the current run's session, used by finetune.tracking.store --------------------------------------------
_current: Session | None = None


def start(run_id: str, uri: str, output_dir) -> Session:
    """Make `run_id`'s session current; its journal lives in the run's output folder."""
    global _current
    _current = Session(run_id, uri, Path(output_dir) / JOURNAL_NAME)
    return _current


def current() -> Session | None:
    """The session of the active run, if start() was called for it."""
    import mlflow

    run = mlflow.active_run()
    if _current is not None and run is not None and run.info.run_id == _current.run_id:
        return _current
    return None


def end_run(status: str = "FINISHED") -> str | None:
    """End the active run through its session (replay, end, summary); plain mlflow.end_run without one."""
    global _current
    session = current()
    if session is None:
        import mlflow

        mlflow.end_run(status)
        return None
    try:
        return session.end(status)
    finally:
        _current = None


# -- replaying a journal later ------------------------------------------------------------------------
def replay(journal_path, tracking_uri: str | None = None, client=None) -> tuple[int, list[dict]]:
    """Send a journal's pending calls in order; returns (sent count, still pending). Raises when the
    server is still unreachable (after recording what did get through)."""
    journal = Journal(Path(journal_path))
    uri = tracking_uri or journal.header.get("tracking_uri")
    if not uri:
        raise ValueError(f"{journal_path}: no tracking URI in the journal; pass --tracking-uri")
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
    sent: list[int] = []
    done = 0
    try:
        for entry in journal.pending():
            try:
                with bounded_http():
                    send(client, entry)
                sent.append(entry["seq"])
                done += 1
            except Exception as error:  # noqa: BLE001
                if is_outage(error):
                    raise
                journal.mark_sent(sent)
                sent = []
                journal.mark_rejected(entry["seq"], one_line(error))
    finally:
        journal.mark_sent(sent)
    return done, journal.pending()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.tracking.outage",
                                     description="Send the calls a run could not log (tracking server "
                                                 "unreachable) to the server now, in order.")
    parser.add_argument("journal", help=f"the run's {JOURNAL_NAME} (in its output folder)")
    parser.add_argument("--tracking-uri", default=None, help="default: the URI the run used")
    args = parser.parse_args(argv)
    path = Path(args.journal)
    if path.is_dir():
        path = path / JOURNAL_NAME
    if not path.is_file():
        print(f"error: journal: received {str(path)!r}; expected a {JOURNAL_NAME} file", file=sys.stderr)
        return 2
    pending = Journal(path).pending()
    try:
        done, left = replay(path, args.tracking_uri)
    except Exception as error:  # noqa: BLE001 - one line, no traceback
        left = Journal(path).pending()
        print(f"error: tracking server still unreachable ({one_line(error)}); "
              f"{len(pending) - len(left)} of {len(pending)} call(s) sent, the rest stay in {path}",
              file=sys.stderr)
        return 1
    rejected = Journal(path).rejected
    print(f"replayed {done} call(s) from {path}" + (f"; {len(rejected)} rejected by the server" if rejected else ""))
    return 0 if not left else 1


if __name__ == "__main__":
    sys.exit(main())
