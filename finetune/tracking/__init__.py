"""MLflow tracking: where runs go and what they record (store), calls that survive a tracking-server
outage (outage), and the replay of what an outage held back (`python -m finetune.tracking.outage`)."""
from finetune.tracking.store import (artifact_location, end_run, flatten, log_artifact, log_metrics, log_params,
                                     metric_key, process_rss_mb, register_model, set_tag, set_tags, start_session,
                                     tracking_uri, ui_hint, use_experiment)

__all__ = ["artifact_location", "end_run", "flatten", "log_artifact", "log_metrics", "log_params", "metric_key",
           "process_rss_mb", "register_model", "set_tag", "set_tags", "start_session", "tracking_uri", "ui_hint",
           "use_experiment"]
