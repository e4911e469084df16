"""Sweeps: the MLflow parent/child runs of a Hydra multirun (parent), the Optuna search (optuna_study),
and sweep jobs in fresh processes (isolated_job)."""


def __getattr__(name: str):
    # `_target_: finetune.sweep.MlflowSweepCallback`, the path before the package was split, still resolves
    if name == "MlflowSweepCallback":
        from finetune.sweep.parent import MlflowSweepCallback

        return MlflowSweepCallback
    raise AttributeError(f"module 'finetune.sweep' has no attribute {name!r}")
