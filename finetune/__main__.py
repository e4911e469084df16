import sys

from finetune.cli import main

if __name__ == "__main__":  # guarded: sweep jobs start fresh processes that re-import this module
    sys.exit(main())
