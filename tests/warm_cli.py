"""A warm start for the tests' CLI calls: `python -m finetune <args>` without paying the imports each time.

On 2 CPU cores importing TensorFlow, Keras and MLflow takes 12-15 s, more than most tiny test runs
themselves. This process imports them once (plus finetune's own modules), runs no TensorFlow op, and then
forks one child per request. The child is a new process that sets the request's working directory,
environment and argv, sends its stdout/stderr to files, and runs `finetune.cli.main`, exactly what
`python -m finetune` runs: signal handlers, atexit handlers and exit status as in a fresh process.

What a fork cannot repeat is what happens *during* those imports; the tests of that (TensorFlow's start-up
lines, the filter that hides them, the commands that never import TensorFlow) start real interpreters,
and `tests/conftest.py` sends any request whose environment differs in what is read at import time
(KERAS_HOME, TF_CPP_MIN_LOG_LEVEL, FINETUNE_TF_LOGS...) to a real interpreter as well.

Protocol (one request at a time): a JSON line on stdin {"argv", "cwd", "env", "stdout", "stderr",
"new_session" (setsid, as Popen's start_new_session), "script" (optional: run that file as __main__ instead,
as `python <script> <argv>` would)};
the reply is a line {"pid": ...} at once and {"returncode": ...} when the child ends (negative: the
signal that ended it, as subprocess reports it).
"""
from __future__ import annotations

import json
import os
import sys


def preload() -> None:
    """What every command imports, without running an op (TensorFlow's runtime starts in each child)."""
    import importlib

    for name in ("tensorflow", "keras", "mlflow", "mlflow.tracking", "hydra", "matplotlib", "PIL.Image",
                 "finetune.cli", "finetune.app.hydra_app", "finetune.tracking.scope", "finetune.train.run",
                 "finetune.train.reports", "finetune.commands.train", "finetune.commands.evaluate",
                 "finetune.commands.predict", "finetune.commands.export", "finetune.commands.extract",
                 "finetune.commands.classify", "finetune.commands.compare", "finetune.data.dataset",
                 # what a run's first MLflow call and Hydra's plugin scan import (~2 s a run otherwise)
                 "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                 "mlflow.store.db.utils", "alembic.script", "alembic.runtime.migration", "git"):
        importlib.import_module(name)
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovers (imports) the installed hydra_plugins once


def run_child(request: dict) -> None:
    """In the forked child: become `python -m finetune <argv>` (or `python <script> <argv>`) and never return."""
    code = 1
    try:
        if request.get("new_session"):
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        try:
            if request.get("script"):  # `python <script> <argv>`
                import runpy

                sys.argv = [request["script"], *request["argv"]]
                sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
                runpy.run_path(request["script"], run_name="__main__")
                code = 0
            else:
                import finetune.__main__ as entry

                sys.argv = [entry.__file__, *request["argv"]]
                code = entry.main(request["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what the interpreter would do: the traceback, status 1
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            import atexit
            import threading

            threading._shutdown()  # what a normal interpreter exit runs: join the threads still running,
            atexit._run_exitfuncs()  # then the exit handlers (MLflow ends runs there)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the imports go to the log, not into the protocol
    preload()
    replies.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    serve()
