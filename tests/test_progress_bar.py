"""Progress of long steps: a tqdm bar with ETA on a terminal, plain lines at a modest rate otherwise."""
from __future__ import annotations

import io

from finetune.progress_bar import PlainProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_rate_and_eta(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    stream = Terminal()
    with progress_bar(100, "extracting features", "images", stream=stream) as bar:
        for _ in range(100):
            bar.update(1)
    text = stream.getvalue()
    assert "\r" in text and "100/100" in text and "extracting features" in text
    assert "<" in text and "images/s" in text  # tqdm's [elapsed<remaining, rate]


def test_without_a_terminal_plain_lines_at_most_every_few_seconds():
    clock = iter(range(0, 1000)).__next__  # one second per reading
    stream = io.StringIO()
    plain = PlainProgress(50, "checking image files", "files", stream, every=10.0, clock=clock)
    for _ in range(50):
        plain.update(1)
    plain.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("   checking image files: 1/50 files") and lines[-1].startswith("   checking image files: 50/50")
    assert 3 <= len(lines) <= 7  # 50 updates over ~50 s: the first, one every 10 s, the last
    assert "s left" in lines[1]


def test_ci_and_files_get_plain_lines_and_tiny_steps_nothing(monkeypatch):
    monkeypatch.setenv("CI", "true")
    stream = Terminal()
    with progress_bar(10, "predicting", "images", stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[0]] and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    with progress_bar(1, "exporting and checking", "formats", stream=quiet) as bar:
        bar.update(1)
    assert quiet.getvalue() == ""
