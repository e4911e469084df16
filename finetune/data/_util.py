"""Small helpers shared by the data modules (pure python)."""
from __future__ import annotations

from finetune.errors import ConfigError, did_you_mean


def suggest(value, options) -> str:
    """"Did you mean 'x'?" when a close option exists, else "" (for ConfigError hints)."""
    text = did_you_mean(str(value), [str(o) for o in options]).strip()
    return "Did you mean" + text[len("(did you mean"):-1] if text else ""


def lookup(registry: dict, key: str, name):
    """registry[name], or a ConfigError naming `key`, the options and the closest one.
    (The same as finetune.registry.lookup, which is not committed yet: switch to it once it is.)"""
    try:
        return registry[name]
    except KeyError:
        options = ", ".join(sorted(registry))
        raise ConfigError(key, name, f"one of {options}{did_you_mean(str(name), registry)}") from None
