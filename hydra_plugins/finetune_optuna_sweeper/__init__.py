"""finetune's Optuna sweeper for Hydra (Hydra discovers plugins in the hydra_plugins namespace)."""
