"""TensorFlow's start-up lines kept off the terminal, unless the user asks for them.

Importing TensorFlow writes from C++ straight to file descriptor 2, before absl's log is set up, so
TF_CPP_MIN_LOG_LEVEL does not reach them: absl's "WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR", cudart_stub's "Could not find cuda drivers",
cpu_feature_guard's instruction notice, oneDNN's notice; listing the devices then adds cuda_platform's
"failed call to cuInit" (an error-level line, on every machine without a GPU). While `tensorflow` is
imported and its devices are listed, fd 2 goes through a filter that drops those lines (and Python
warnings raised by the import) and passes everything else through, in order: fatal (F) lines, other
error lines, tracebacks, anything it does not recognise. After that, fd 2 is the terminal again and
TF_CPP_MIN_LOG_LEVEL (2 unless the user set it) governs TensorFlow's own log.

The filter is a separate process, not a thread: if TensorFlow aborts during the import, what it wrote
still reaches the terminal (the filter reads to the end of the pipe after this process is gone).

The user asks for TensorFlow's lines with FINETUNE_TF_LOGS=1, or by setting TF_CPP_MIN_LOG_LEVEL to 0
or 1 (TensorFlow's own switch for its INFO/WARNING lines); then nothing is filtered. Run as a script
(`python -I -S tf_logs.py LEVEL`) this module is the filter itself, hence stdlib imports only.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import signal
import subprocess
import sys
import warnings

SWITCH = "FINETUNE_TF_LOGS"
TF_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = 2  # TensorFlow's own log after start-up: errors and fatal lines only

_ABSL_PREINIT = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl's format (I0000 00:00:1796209166.090309 6937 cudart_stub.cc:31] ..., or with a wall-clock time) and
# TF < 2.16's (2024-01-01 12:00:00.000001: I tensorflow/core/util/port.cc:113] ...)
_LOG_LINE = re.compile(r"(?:([IWEF])\d{4} \d+:\d+:\d+\.\d+\s+\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) )"
                       r"\S+:\d+\] ")
# the second line of cpu_feature_guard's notice, which has no log prefix of its own
_CONTINUATION = re.compile(r"To enable the following instructions: .*, in other operations, rebuild TensorFlow "
                           r"with the appropriate compiler flags\.")
# error-level lines that only say this machine has no (usable) GPU, or TF's duplicate-plugin bug
_NO_GPU = re.compile(r"failed call to cuInit|Could not find cuda drivers|Unable to register cu(DNN|FFT|BLAS) factory"
                     r"|could not open file to read NUMA node|TF-TRT Warning: Could not find TensorRT")


def asked_for_tf_logs(environ=os.environ) -> bool:
    """True when the user asked to see TensorFlow's own lines: FINETUNE_TF_LOGS=1, or TF_CPP_MIN_LOG_LEVEL 0 or 1."""
    if environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return environ.get(TF_LEVEL, "").strip() in ("0", "1")


def min_level(environ=os.environ) -> int:
    """TF_CPP_MIN_LOG_LEVEL as a number (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL only)."""
    try:
        return min(max(int(environ.get(TF_LEVEL, DEFAULT_LEVEL)), 0), 3)
    except ValueError:
        return DEFAULT_LEVEL


def is_noise(line: str, level: int = DEFAULT_LEVEL) -> bool:
    """True for a line of TensorFlow's start-up chatter a user need not see; never for a fatal line,
    a traceback, a Python message or anything else not in TensorFlow's log format."""
    line = line.rstrip("\r\n")
    if line == _ABSL_PREINIT or _CONTINUATION.fullmatch(line):
        return True
    match = _LOG_LINE.match(line)
    if not match:
        return False
    severity = "IWEF".index(match.group(1) or match.group(2))
    if severity == 3:
        return False
    return severity < level or bool(_NO_GPU.search(line))


def forward(source, sink, level: int = DEFAULT_LEVEL) -> None:
    """Copy the lines of `source` (bytes) to `sink` but the noise, each as soon as it is complete."""
    for raw in source:
        if sink is None or is_noise(raw.decode("utf-8", "replace"), level):
            continue
        try:
            sink.write(raw)
            sink.flush()
        except OSError:  # the terminal went away: keep draining, so the writer never blocks
            sink = None


@contextlib.contextmanager
def filtered_stderr(level: int = DEFAULT_LEVEL):
    """Inside: file descriptor 2 (C++ and Python alike) goes through the filter process; on the way out
    it is the terminal again, once the filter has written everything that came before."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        filter_process = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(level)],
                                          stdin=read_end, stdout=saved, stderr=saved)
    except OSError:  # no filter: everything reaches the terminal, as without this
        filter_process = None
    os.close(read_end)
    if filter_process is not None:
        os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if filter_process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a process started inside still writes
                filter_process.wait(timeout=10)


class _QuietLoader(importlib.abc.Loader):
    """tensorflow's own loader, run inside filtered_stderr; its devices are listed there too."""

    def __init__(self, loader, level: int | None):
        self.loader, self.level = loader, level  # level None: nothing filtered (the user asked for the lines)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            with (filtered_stderr(self.level) if self.level is not None else contextlib.nullcontext()), \
                    warnings.catch_warnings():
                if self.level is not None:
                    warnings.simplefilter("ignore")  # what the import warns about, the user cannot act on
                self.loader.exec_module(module)
                _list_devices(module)
            from finetune.app import tf_devices  # here, not at the top: this file also runs as the filter

            tf_devices.configure(module)  # FINETUNE_LOGICAL_CPUS, before any device is initialised
        finally:
            module.__loader__ = module.__spec__.loader = self.loader


def _list_devices(tf) -> None:
    """Where "failed call to cuInit" is written: listing the physical devices (it initialises no device,
    so memory growth and visible devices can still be set afterwards)."""
    try:
        tf.config.list_physical_devices()
    except Exception:  # noqa: BLE001 - the command meets the same problem later and reports it there
        pass


class _QuietTensorflowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, through the finders after it, and hands it a quiet loader (level None:
    one that filters nothing and only sets up the devices)."""

    def __init__(self, level: int | None):
        self.level = level

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self.level)
        return spec


def quiet_tensorflow(environ=os.environ) -> bool:
    """Unless the user asked for TensorFlow's lines: TF_CPP_MIN_LOG_LEVEL=2 where unset, and the first
    `import tensorflow` (keras, tensorflow_datasets...) of this process runs with stderr filtered. Either
    way the import then sets up the devices (finetune.app.tf_devices). True when the filter is in place."""
    quiet = not asked_for_tf_logs(environ)
    if quiet:
        environ.setdefault(TF_LEVEL, str(DEFAULT_LEVEL))
    if "tensorflow" in sys.modules:
        return False
    from finetune.app import tf_devices

    tf_devices.before_import(environ)
    if not any(isinstance(f, _QuietTensorflowImport) for f in sys.meta_path):  # also sets up the devices
        sys.meta_path.insert(0, _QuietTensorflowImport(min_level(environ) if quiet else None))
    return quiet


if __name__ == "__main__":  # the filter process: stdin is the pipe, stdout the terminal's stderr
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole process group: drain, then end
        signal.signal(signum, signal.SIG_IGN)
    forward(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_LEVEL)
