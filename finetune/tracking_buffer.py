"""Moved to `finetune.tracking.outage`. Kept so that `python -m finetune.tracking_buffer <journal>`, which
earlier READMEs and run summaries printed, still replays a journal."""
import sys

from finetune.tracking.outage import main

if __name__ == "__main__":
    print("note: finetune.tracking_buffer moved to finetune.tracking.outage "
          "(python -m finetune.tracking.outage <journal>)", file=sys.stderr)
    sys.exit(main())
