"""Moved: the journal and its replay are `finetune.tracking.journal`, the bounded calls and the Session
`finetune.tracking.outage`. Kept so that `python -m finetune.tracking_buffer <journal>`, which earlier
READMEs and run summaries printed, still replays a journal."""
import sys

from finetune.tracking.journal import JOURNAL_NAME, Journal, main, replay  # noqa: F401 - the old names

if __name__ == "__main__":
    print("note: the replay command is now python -m finetune.tracking.journal <journal>", file=sys.stderr)
    sys.exit(main())
