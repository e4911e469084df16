"""Progress of the long steps a user waits on (the pre-flight scan of a folder, feature extraction, export's
checks): a tqdm bar with rate and ETA on a terminal; plain lines at a modest rate when output goes to a
file or CI (a bar redrawn with carriage returns turns a log into one unreadable line).

    with progress_bar(total=len(paths), desc="checking files", unit="file") as bar:
        for ...:
            bar.update(1)

Pure Python (tqdm), no TensorFlow: the scan runs before TensorFlow is imported.
"""
from __future__ import annotations

import os
import sys
import time

# without a terminal: a line at most this often (plus the first and the last)
PLAIN_EVERY_S = 10.0
# steps shorter than this total show nothing at all (a 20-image extract needs no bar)
MIN_TOTAL = 2


def is_terminal(stream) -> bool:
    """A bar only for a person at a terminal: not in CI, not into a file or pipe."""
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class PlainProgress:
    """`done/total unit (rate, ETA)` lines, the first at once, then at most every `every` seconds, and the last."""

    def __init__(self, total: int, desc: str, unit: str, stream, every: float = PLAIN_EVERY_S, clock=time.monotonic):
        self.total, self.desc, self.unit, self.stream, self.every, self.clock = total, desc, unit, stream, every, clock
        self.done, self.start = 0, clock()
        self.last = None
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.last is None or now - self.last >= self.every or self.done >= self.total:
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _line(self, now: float) -> None:
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
        eta = f", {left:.0f} s left" if self.done < self.total and self.done else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"   {self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s{eta}{extra})",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.done < self.total and self.last != self.clock():
            self._line(self.clock())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class progress_bar:  # noqa: N801 - used like a function, as tqdm is
    """A context manager giving `.update(n)` / `.set_postfix_str(text)`: tqdm on a terminal, else PlainProgress."""

    def __init__(self, total: int, desc: str, unit: str = "it", stream=None, every: float = PLAIN_EVERY_S,
                 min_total: int = MIN_TOTAL):
        self.total, self.desc, self.unit, self.every, self.min_total = int(total), desc, unit, every, min_total
        self.stream = stream if stream is not None else sys.stdout

    def __enter__(self):
        if self.total < self.min_total:
            self.bar = _Silent()
        elif is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=f"   {self.desc}", unit=f" {self.unit}", file=self.stream,
                            dynamic_ncols=True, leave=True)
        else:
            self.bar = PlainProgress(self.total, self.desc, self.unit, self.stream, self.every)
        return self.bar

    def __exit__(self, *exc) -> None:
        self.bar.close()
