"""Devices set up the moment TensorFlow is imported, before anything initialises them.

FINETUNE_LOGICAL_CPUS=N splits the CPU into N logical devices, so that `trainer.strategy=mirrored` runs N
replicas on a machine without GPUs: how the tests check distributed training, and a way to try a strategy
before taking it to GPUs (it does not make training faster: the replicas share the same cores).
TensorFlow accepts this only before its devices are initialised, hence at import: finetune.app.tf_logs'
import hook calls configure() right after `import tensorflow`.

With logical CPU devices, oneDNN is turned off (TF_ENABLE_ONEDNN_OPTS=0, unless set): TensorFlow 2.21's
oneDNN convolution returns its input's shape for an empty batch ("Incompatible shapes: [32] vs.
[0,32,32,3]"), and a replica gets an empty batch whenever a last batch holds fewer images than there
are replicas (33 images in batches of 16 on 2 replicas: the last image goes to one replica, none to the
other). Measured with plain Keras: fit, evaluate and predict all fail that way with oneDNN, and all
work without it. GPUs do not use oneDNN."""
from __future__ import annotations

import os
import sys

LOGICAL_CPUS = "FINETUNE_LOGICAL_CPUS"


def logical_cpus(environ=os.environ) -> int:
    """The number asked for (0: leave the CPU as one device). A bad value is said once and ignored."""
    raw = environ.get(LOGICAL_CPUS, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        print(f"finetune: {LOGICAL_CPUS}={raw!r} ignored: expected a whole number of logical CPU devices "
              "(2 or more), e.g. FINETUNE_LOGICAL_CPUS=2", file=sys.stderr)
        return 0
    return int(raw)


def before_import(environ=os.environ) -> None:
    """What must be in the environment before `import tensorflow` (see the module docstring)."""
    if logical_cpus(environ) >= 2:
        environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def configure(tf, environ=os.environ) -> None:
    """Split the first CPU into FINETUNE_LOGICAL_CPUS logical devices (before any device is initialised)."""
    count = logical_cpus(environ)
    if count < 2:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:  # devices already initialised (TensorFlow was imported before the hook)
        print(f"finetune: {LOGICAL_CPUS}={count} not applied: {error}", file=sys.stderr)
