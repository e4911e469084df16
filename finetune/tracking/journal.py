"""The tracking journal: what a run could not log while its tracking server was away, and its replay.

The journal is plain JSON lines (never pickle), `tracking_journal.jsonl` in the run's output folder: a
header line ({"journal", "version", "tracking_uri", "run_id"}), one line per call ({"seq", "op", ...}),
and {"sent": [...]} / {"rejected": seq} / {"superseded": seq} lines recording what became of them. It is
append-only, so a kill at any moment loses at most the line being written.

`python -m finetune.tracking.journal <journal>` sends what is still pending, in order (metrics keep
their step and timestamp), sets the run's final status if the run's end is in it, and records what it
sent, so a second replay sends nothing again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.tracking.outage import bounded_http, is_outage, one_line, send

JOURNAL_NAME = "tracking_journal.jsonl"
REPLAY_COMMAND = "python -m finetune.tracking.journal"


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

    def describe(self) -> str:
        """What is pending, in words (see `describe`)."""
        return describe(self.pending())

    def replay_hint(self) -> str:
        return f"{REPLAY_COMMAND} {self.path}"


def describe(entries: list[dict]) -> str:
    """'12 metric values, 3 params, 1 tag, 2 artifacts, the run's end (FINISHED)'."""
    counts = {"metric value": 0, "param": 0, "tag": 0, "artifact": 0, "model registration": 0}
    sizes = {"metrics": ("metric value", "metrics"), "params": ("param", "params"), "tags": ("tag", "tags")}
    end = None
    for entry in entries:
        op = entry["op"]
        if op in sizes:
            name, field = sizes[op]
            counts[name] += len(entry[field])
        elif op == "series":
            counts["metric value"] += len(entry["values"])
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


def main(argv: list[str] | None = None, prog: str = REPLAY_COMMAND) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Send the calls a run could not log (tracking server "
                                                            "unreachable) to the server now, in order.")
    parser.add_argument("journal", help=f"the run's {JOURNAL_NAME} (or its output folder)")
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
