"""MLflow tracking: the one run scope every command opens (`with tracking.run(cfg, command=...) as run:`,
scope), where runs go and what they record (store), calls that survive a tracking-server outage (outage),
and the journal of what an outage held back with its replay command (`python -m finetune.tracking.journal`).

The names below are looked up on first use (PEP 562), so that `python -m finetune.tracking.journal` runs
the journal module once, as the program, rather than after this package imported it as a module."""
import importlib

_HOMES = {"Run": "scope", "run": "scope",
          **{name: "store" for name in ("artifact_location", "flatten", "log_artifact", "log_metrics", "log_series", "log_params",
                                        "metric_key", "process_rss_mb", "register_model", "set_tag", "set_tags",
                                        "tracking_uri", "ui_hint", "use_experiment")}}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'finetune.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(f"finetune.tracking.{_HOMES[name]}"), name)
