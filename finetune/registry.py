"""Plain registries: a dict from the name a user writes to what builds it; an unknown name is one error."""
from __future__ import annotations

from finetune.errors import ConfigError, did_you_mean


def lookup(registry: dict, key: str, name):
    """registry[name], or a ConfigError naming `key`, the options and the closest one."""
    try:
        return registry[name]
    except KeyError:
        options = ", ".join(sorted(registry))
        raise ConfigError(key, name, f"one of {options}{did_you_mean(str(name), registry)}") from None
