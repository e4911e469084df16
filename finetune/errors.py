"""User-facing errors: one line naming the key or file, what was received, what is expected."""
from __future__ import annotations

import difflib


class FinetuneError(Exception):
    """An error caused by the user's input; reported as one line, no traceback."""


class ConfigError(FinetuneError):
    """A config value that cannot work. Rendered as `<key>: received <value>; expected <what>`."""

    def __init__(self, key: str, received: object, expected: str, hint: str = ""):
        self.key, self.received, self.expected, self.hint = key, received, expected, hint
        message = f"{key}: received {received!r}; expected {expected}"
        super().__init__(f"{message}. {hint}" if hint else message)


class DataError(FinetuneError):
    """A dataset that cannot be used as given (missing path, empty class folder, ...)."""


def did_you_mean(value: str, options) -> str:
    """' (did you mean x?)' when a close option exists, else ''."""
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
