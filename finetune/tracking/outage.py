"""Tracking that survives a tracking-server outage: bounded calls, a circuit breaker, the run's Session.

With a remote (http/https) tracking URI, every metric, param, tag, artifact and the run's end go
through one `Session` (the run scope, finetune.tracking.scope, opens it):

- each call to the server is bounded: no retries, `FINETUNE_TRACKING_TIMEOUT` seconds (default 10)
  per request, instead of MLflow's default 7 retries with backoff and a 120 s timeout (about 4 minutes
  of blocking per call before it raises);
- a call that fails because the server is unreachable (or answers 5xx/429) is appended to the run's
  journal (finetune.tracking.journal), one loud warning is printed, and a circuit breaker opens: for
  the next `cooldown` seconds (15 s, doubling up to 5 minutes while the server stays away) calls go
  straight to the journal without touching the network, so the command runs at full speed;
- at the first call after the cooldown, the journal is replayed in order (metrics with their original
  step and timestamp) and, if that works, direct logging resumes and a second line says so;
- at the end of the run, what is still pending is replayed once more, the run is ended, and a final
  line says what could not be logged and how to replay it later (`python -m finetune.tracking.journal
  <journal>`, which also sets the run's final status).

Local stores (sqlite, file paths) are written directly: no journal, no extra cost.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time

TIMEOUT_ENV = "FINETUNE_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 10
ARTIFACT_TIMEOUT_S = 120  # an upload may legitimately take a while between two socket reads
FIRST_COOLDOWN_S, MAX_COOLDOWN_S = 15.0, 300.0
HOLD_METRICS_S = 1.0  # a run's metrics wait up to this long, then one log_batch sends them together
STARTUP_RETRIES = 2  # finding the experiment before the run: a server restarting gets ~3 s, not 4 minutes
# MLflow's limits per log_batch request
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100
# MLflow error codes that are the caller's fault, not an outage: replaying them later would fail again
# A server that refuses the login (401) or this user (403) is up: it must not read as an outage
AUTH_ERRORS = {"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED"}
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                 "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST", *AUTH_ERRORS}


def is_remote(uri: str | None) -> bool:
    return bool(uri) and str(uri).lower().startswith(("http://", "https://"))


def is_outage(error: BaseException) -> bool:
    """True for an unreachable/overloaded server; False for a call the server would always reject
    (or a local mistake such as a missing file): those are raised as before, not journaled."""
    if isinstance(error, (FileNotFoundError, IsADirectoryError, TypeError, ValueError, KeyError)):
        return False
    return getattr(error, "error_code", None) not in CLIENT_ERRORS


def refused(uri: str, error: BaseException):
    """A FinetuneError line for a server that refused the login or this user, else None."""
    from finetune.errors import FinetuneError

    code = getattr(error, "error_code", None)
    if code not in AUTH_ERRORS:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "PERMISSION_DENIED":
        return FinetuneError(f"tracking.uri: the tracking server {uri} refused user {user!r} ({code}): it needs EDIT "
                             "permission on the experiment (an admin grants it: scripts/tracking_server.sh add-user "
                             "... --experiment NAME), or use an experiment of its own (tracking.experiment=...)")
    who = f"the login of user {user!r}" if user else "a client without a login"
    return FinetuneError(f"tracking.uri: the tracking server {uri} refused {who} ({code}): set "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account on it")


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


# -- sending one entry ---------------------------------------------------------------------------------
def send(client, entry: dict) -> None:
    """One journal entry to the server through an MlflowClient (raises what the client raises)."""
    from mlflow.entities import Param, RunTag

    run_id, op = entry["run_id"], entry["op"]
    if op in ("metrics", "series"):  # series: one metric at many steps (the rate of every optimizer update)
        send_metrics(client, [entry])
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


def send_metrics(client, entries: list[dict]) -> None:
    """"metrics"/"series" entries of one run in as few log_batch calls as MLflow allows."""
    from mlflow.entities import Metric

    items = []
    for entry in entries:
        if entry["op"] == "metrics":
            items += [Metric(key, _number(value), int(entry["timestamp"]), int(entry.get("step") or 0))
                      for key, value in entry["metrics"].items()]
        else:
            items += [Metric(entry["key"], _number(value), int(entry["timestamp"]), int(step))
                      for step, value in entry["values"]]
    for start in range(0, len(items), BATCH_METRICS):
        client.log_batch(entries[0]["run_id"], metrics=items[start:start + BATCH_METRICS])


def _number(value) -> float:
    return float(value) if value is not None else math.nan


# -- the per-run session -------------------------------------------------------------------------------
class HeldMetrics:
    """A run's metrics and series waiting to go in one log_batch: until `hold_s` has passed since the last
    send, then with the next one, before anything else is sent and at the end. An epoch's metrics and its
    learning-rate series were two SQLite transactions (~10 ms each here), 40 in a 20-epoch run of 1.6 s; a
    slow epoch's metrics still go at once. The run scope holds them 1 s (HOLD_METRICS_S); 0: each call goes
    as made. A kill loses at most what was held: a resumed run logs again the epochs its checkpoint has and
    the run lacks (finetune.train.progress)."""

    def __init__(self, hold_s: float, clock):
        self.hold_s, self.clock, self.entries, self.sent_at = hold_s, clock, [], clock()

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: dict) -> bool:
        """Hold `entry`; True when what is held is due."""
        self.entries.append(entry)
        return self.clock() - self.sent_at >= self.hold_s

    def take(self) -> list[dict]:
        entries, self.entries, self.sent_at = self.entries, [], self.clock()
        return entries


class Breaker:
    """Delivery to one run for a Session: local stores through MLflow's client as is; remote URIs with
    bounded calls, the circuit breaker and the journal (see the module's docstring). Everything is sent
    to `run_id` through an MlflowClient, so the run need not be MLflow's active run (a sweep's parent, or
    the model's run that evaluate/export add to). `journal` is a finetune.tracking.journal.Journal (given,
    not built here: the journal's replay command sends its entries with `send` above)."""

    def __init__(self, run_id: str, uri: str, journal, *, client=None, first_cooldown: float = FIRST_COOLDOWN_S,
                 max_cooldown: float = MAX_COOLDOWN_S, clock=time.monotonic, stream=None):
        self.run_id, self.uri = run_id, uri
        self.remote = is_remote(uri)
        self.journal = journal
        self._client = client
        self.first_cooldown, self.max_cooldown = first_cooldown, max_cooldown
        self.cooldown = first_cooldown
        self.open_until: float | None = None  # breaker open until this clock time
        self.clock = clock
        self.stream = stream
        self.blocked_s = 0.0  # time spent in calls that failed (what the outage cost the command)
        self.outages = 0
        self.lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _say(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def _deliver(self, entries: list[dict], call):
        """call(client) sends `entries`; while the server is away they are journaled instead."""
        if not self.remote:
            return call(self.client)
        with self.lock:
            if self.open_until is not None:
                if self.clock() < self.open_until or not self._replay_pending():
                    for entry in entries:
                        self.journal.append(entry)
                    return None
            try:
                return self._timed(call)
            except Exception as error:  # noqa: BLE001 - an outage is journaled, anything else raised
                refusal = refused(self.uri, error)
                if refusal is not None:  # a password changed or a permission revoked mid-run: say so
                    raise refusal from None
                if not is_outage(error):
                    raise
                for entry in entries:
                    self.journal.append(entry)
                self._opened(error)

    def _timed(self, function, *args):
        """function(client, *args), bounded; the time of a failed call is counted."""
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
                      f"The command goes on; metrics, params, tags and artifacts are kept in {self.journal.path} "
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

    def summary(self) -> str | None:
        pending = self.journal.pending()
        if pending:
            ends = any(entry["op"] == "end_run" for entry in pending)
            text = (f"WARNING: tracking server {self.uri} unreachable at the end of the run "
                    f"({self.blocked_s:.1f} s spent in failed calls): not logged: {self.journal.describe()}; "
                    + (f"run {self.run_id} stays RUNNING there until replayed. " if ends else "")
                    + f"Kept in {self.journal.path}; replay with: {self.journal.replay_hint()}")
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


class Session(Breaker):
    """One run's logging: what a command calls, delivered by the Breaker. `hold_s`: see HeldMetrics."""

    def __init__(self, run_id: str, uri: str, journal, *, client=None, ender=None,
                 first_cooldown: float = FIRST_COOLDOWN_S, max_cooldown: float = MAX_COOLDOWN_S,
                 clock=time.monotonic, stream=None, hold_s: float = 0.0):
        super().__init__(run_id, uri, journal, client=client, first_cooldown=first_cooldown,
                         max_cooldown=max_cooldown, clock=clock, stream=stream)
        self._ender = ender
        self.held = HeldMetrics(hold_s, clock)
        for entry in self.journal.pending():  # this run is being continued (resumed): it has not ended
            if entry["op"] == "end_run" and entry["run_id"] == run_id:
                self.journal.mark_superseded(entry["seq"])
        if self.journal.entries:  # left by an earlier process of this run: replay at the first chance
            self.open_until = clock()

    # what the command calls
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._hold({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()},
                    "step": int(step or 0), "timestamp": now_ms()})

    def log_series(self, key: str, values) -> None:
        """`key` at many steps in one call: `values` is [(step, value), ...]."""
        self._hold({"op": "series", "key": key, "values": [[int(s), float(v)] for s, v in values],
                    "timestamp": now_ms()})

    def _hold(self, body: dict) -> None:
        if self.held.add({"run_id": self.run_id, **body}):
            self.flush()

    def flush(self) -> None:
        """Send the held metrics now (one log_batch), or journal them while the server is away."""
        held = self.held.take()
        if held:
            self._deliver(held, lambda client: send_metrics(client, held))

    def log_params(self, params: dict) -> None:
        self.submit({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict) -> None:
        self.submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        """A file, or a folder (its contents go under artifact_path)."""
        local = os.path.realpath(str(local_path))
        if not os.path.exists(local):
            raise FileNotFoundError(f"artifact to log does not exist: {local}")
        self.submit({"op": "artifact", "local_path": local, "artifact_path": artifact_path})

    def register_model(self, name: str, source: str) -> str | None:
        """The new version, or None when the registration was journaled (server unreachable)."""
        return self.submit({"op": "register_model", "name": name, "source": source})

    def submit(self, body: dict):
        """Send now (what send returns), or journal it (None) while the server is unreachable. Held
        metrics go first."""
        if self.held:
            self.flush()
        entry = {"run_id": self.run_id, **body}
        return self._deliver([entry], lambda client: send(client, entry))

    def end(self, status: str | None = "FINISHED") -> str | None:
        """Replay what is pending, end the run with `status` (None: leave its status as it is) on the
        server if it is there, else journal the end; say what was lost."""
        if self.held:
            self.flush()
        if not self.remote:
            if status:
                self._end(status)
            return None
        with self.lock:
            if self.journal.entries:
                self._replay_pending()
            if status:
                self._end_or_journal(status)
            return self.summary()

    def _end_or_journal(self, status: str) -> None:
        end_time = now_ms()
        try:
            if self.journal.entries:  # the server is away: don't call it again, just end locally
                raise ConnectionError("earlier calls still pending")
            self._timed(lambda _client: self._end(status))
        except Exception as error:  # noqa: BLE001
            if not is_outage(error):
                raise
            self.journal.append({"run_id": self.run_id, "op": "end_run", "status": status, "end_time": end_time})
            with contextlib.suppress(Exception), bounded_http(1):  # leave no active run behind in this process
                self._end_active(status)

    def _end(self, status: str) -> None:
        if self._ender is not None:
            self._ender(status)
        elif not self._end_active(status):  # not this process's active run (a sweep's parent)
            self.client.set_terminated(self.run_id, status)

    def _end_active(self, status: str) -> bool:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            return False
        mlflow.end_run(status)
        return True


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


def make_current(session: Session | None) -> None:
    """Route finetune.tracking's module-level logging (what train/ calls) through `session` (None: stop)."""
    global _current
    _current = session


def current() -> Session | None:
    """The current run scope's session, unless another run is MLflow's active run in this process."""
    if _current is None:
        return None
    import mlflow

    run = mlflow.active_run()
    return _current if run is None or run.info.run_id == _current.run_id else None


if __name__ == "__main__":  # the replay command's earlier name: run it (finetune.tracking.journal) as the program
    import runpy

    print("note: the replay command is now python -m finetune.tracking.journal <journal>", file=sys.stderr)
    runpy.run_module("finetune.tracking.journal", run_name="__main__", alter_sys=True)
