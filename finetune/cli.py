"""`finetune <command> [hydra overrides]`: one Hydra app per command; `python -m finetune` too."""
from __future__ import annotations

import os
import sys

from finetune.config.paths import conf_dir  # noqa: F401 - earlier home of conf_dir (scripts import it)
from finetune.errors import did_you_mean

COMMANDS = {
    "train": "train a head (and optionally the last blocks of a backbone) on a dataset; record it in MLflow",
    "lr_find": "the learning-rate range test on a train config's first stage: plot and suggested lr",
    "classify": "label images with a pretrained ImageNet classifier: top-k classes with probabilities",
    "extract": "turn a dataset or images into feature vectors (.npz/.parquet) with a backbone",
    "predict": "label images with a model that train produced",
    "evaluate": "metrics, per-class report and confusion matrix of a trained model on a dataset",
    "export": "write a trained model as .keras / SavedModel / TFLite and check each against Keras",
    "compare": "table (and plot) of the runs of a sweep or an experiment, best first",
    "cache": "list or clear the feature cache (backbone features that frozen-backbone training reuses)",
}

USAGE = """usage: finetune <command> [hydra overrides] [hydra flags]

commands:
{commands}

Every Hydra flag works after the command: --help (config groups and options), --cfg job
(print the resolved config, run nothing), --info, -m/--multirun (sweeps).
Example: finetune train backbone=resnet50 freeze=last_n freeze.n=2 head=mlp data=folder data.path=~/photos
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {n:<10} {d}" for n, d in COMMANDS.items())))
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: command: received {command!r}; expected one of {', '.join(COMMANDS)}"
              f"{did_you_mean(command, COMMANDS)}", file=sys.stderr)
        return 2
    from finetune.app.keras_import import keras_without_sklearn
    from finetune.app.tf_logs import quiet_tensorflow

    quiet_tensorflow()  # TensorFlow's start-up lines off the terminal, unless FINETUNE_TF_LOGS=1
    keras_without_sklearn()  # ~0.8 s less start-up: Keras' scikit-learn wrappers, which finetune never uses
    from finetune.app.hydra_app import precheck, run_app

    message = precheck(command, rest)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 2
    return run_app(command, rest)


if __name__ == "__main__":
    sys.exit(main())
