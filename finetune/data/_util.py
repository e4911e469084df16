"""Small helpers shared by the data modules (pure python)."""
from __future__ import annotations

from finetune.errors import did_you_mean


def suggest(value, options) -> str:
    """"Did you mean 'x'?" when a close option exists, else "" (for ConfigError hints)."""
    text = did_you_mean(str(value), [str(o) for o in options]).strip()
    return "Did you mean" + text[len("(did you mean"):-1] if text else ""

