"""`finetune lr_find`: the learning-rate range test on the first stage of a train config.

The same config as `finetune train` (backbone, freeze, head, data, optimizer, loss, augment, ...): the
model is built and frozen as the first stage would be, then trained for trainer.lr_find_steps steps at an
exponentially rising rate (finetune.train.lr_finder), on cached features when the backbone is frozen.
The loss-vs-rate plot, the table and the suggested optimizer.lr go to an MLflow run; nothing is saved as
a model. `finetune train optimizer.lr=auto` does the same at the start of a training run.
"""
from __future__ import annotations

from pathlib import Path

from finetune.errors import ConfigError


def run(cfg, output_dir: Path) -> dict:
    from finetune import tracking
    from finetune.commands.train import prepare

    if cfg.data.source == "features":
        raise ConfigError("data", "features", "image data for lr_find (on a features folder: "
                                              "finetune train data=features optimizer.lr=auto)")
    spec, dataset = prepare(cfg)
    output_dir = Path(output_dir)
    with tracking.run(cfg, command="lr_find", output_dir=output_dir) as active:
        from finetune.train.run import range_test_only

        lr = range_test_only(cfg, spec, dataset, output_dir)
    from finetune.tracking.store import ui_hint

    print("\n== finetune lr_find: done ==")
    print(f"  suggested optimizer.lr   {lr:.3g}")
    print(f"  plot                     {output_dir / 'lr_find.png'}")
    print(f"  run id                   {active.run_id}")
    print(f"  look at it               {ui_hint(active.uri, active.experiment_id, active.run_id)}")
    print(f"  train with it            finetune train optimizer.lr={lr:.3g} ... (or optimizer.lr=auto)")
    return {"suggested_lr": lr}
