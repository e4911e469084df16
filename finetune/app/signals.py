"""SIGTERM (what SLURM, Kubernetes and `kill` send) as an exception, so a run ends KILLED at once and
keeps its checkpoint for a resume, instead of dying with its MLflow run left RUNNING."""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (not an Exception: nothing that
    catches Exception should swallow it)."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises():
    """Inside: SIGTERM raises Terminated in the main thread (outside the main thread: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
