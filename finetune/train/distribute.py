"""trainer.strategy: the tf.distribute strategy a training run builds and fits its model under.

    none          TensorFlow's default strategy: one device
    mirrored      MirroredStrategy: one replica per GPU, or per logical CPU device where there is no GPU
                  (FINETUNE_LOGICAL_CPUS=N, finetune.app.tf_devices: how it is tested on a CPU)
    multi_worker  MultiWorkerMirroredStrategy: one process per machine (or per GPU), the cluster from
                  TF_CONFIG, or from SLURM's variables (SlurmClusterResolver) inside a SLURM job
    auto          mirrored where more than one GPU is visible, else none

trainer.batch_size is the global batch: each of R replicas computes batch_size / R of every batch and
the gradients are summed across them, so one step with R replicas is one step of the whole batch (the
same weights as on one device, up to the order of float additions). A larger global batch usually wants
a larger learning rate: `optimizer.lr_scaling=linear` multiplies optimizer.lr by
batch_size / optimizer.lr_reference_batch (Goyal et al. 2017), best with a warmup (schedule.warmup_epochs).

Keras 3.15 on TensorFlow 2.21 cannot `fit` under MultiWorkerMirroredStrategy as shipped
(keras-team/keras#20585): before the first step, `fit` averages a sample batch across replicas only to
learn its shapes (under multi_worker strategy.reduce of a PerReplica fails: "Attempt to convert a value
(PerReplica...)"; under mirrored it fails when the first batch does not split evenly: "Inputs to
operation AddN must have the same size and shape"), and each step averages the scalar loss and metrics
across workers with `reduce("MEAN", axis=0)`, which fails on a scalar ("Invalid reduction dimension 0 for
input with 0 dimensions"). `patch_keras` replaces those two spots, for this process only, when a
strategy is created: the shapes from the pipeline's element spec (which also keeps the data order: the
shipped build opens an iterator of its own, so the training iterator reshuffles differently from a
one-device run), the scalars averaged across workers. Training itself is Keras' own (gradients all-reduced
by the strategy); measured (tests/test_distribute.py): 2 replicas and 2 workers give the same weights as one
device up to float round-off (2.3e-5 to 2.5e-4 over three seeds; summing instead of averaging: 6.0e-3).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config.schema import Strategy, choice
from finetune.errors import ConfigError

STRATEGIES = tuple(s.value for s in Strategy)  # the schema's trainer.strategy choices
_CREATED: dict[str, "Distribution"] = {}  # one strategy of each kind per process (multi_worker: must be)


@dataclass(frozen=True)
class Distribution:
    name: str  # none | mirrored | multi_worker
    strategy: Any
    reason: str

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def is_chief(self) -> bool:
        """The one process that writes MLflow and files (every process but the chief of a multi-worker
        cluster trains in lock-step and keeps its records in a scratch folder)."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if self.name != "multi_worker" or resolver is None:
            return True
        return chief_task(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)

    @property
    def worker(self) -> str:
        resolver = getattr(self.strategy, "cluster_resolver", None)
        return f"{resolver.task_type} {resolver.task_id}" if resolver is not None else "local"

    def describe(self) -> str:
        return f"strategy {self.name}, {self.replicas} replica(s) ({self.reason})"

    def scope(self):
        return self.strategy.scope() if self.name != "none" else contextlib.nullcontext()


def chief_task(cluster: dict, task_type: str | None, task_id: int | None) -> bool:
    """TensorFlow's convention: the `chief` task if the cluster has one, else worker 0."""
    if "chief" in cluster:
        return task_type == "chief"
    return task_type in (None, "worker") and int(task_id or 0) == 0


def choose(name: str) -> Distribution:
    """The strategy for trainer.strategy=`name`, created once per process and kept."""
    name = str(name)
    if name not in STRATEGIES:
        raise ConfigError("trainer.strategy", name, " | ".join(STRATEGIES))
    import tensorflow as tf

    if name == "auto":  # physical: listing them initialises nothing (multi_worker needs that)
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if name not in _CREATED:
        _CREATED[name] = _create(name, tf)
    return _CREATED[name]


def _create(name: str, tf) -> Distribution:
    if name == "none":
        return Distribution("none", tf.distribute.get_strategy(), "one device")
    patch_keras()
    # its Python logger says "Reduce to ... then broadcast to ..." at INFO for every variable (Hydra logs INFO)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        kind = "GPU" if gpus else "logical CPU device"
        return Distribution("mirrored", tf.distribute.MirroredStrategy(devices),
                            f"{len(devices)} {kind}(s): " + ", ".join(d.rsplit("/", 1)[-1] for d in devices))
    resolver, source = cluster_resolver(tf)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    workers = sum(len(v) for v in resolver.cluster_spec().as_dict().values())
    return Distribution("multi_worker", strategy, f"{workers} worker(s) from {source}, this one "
                                                  f"{resolver.task_type} {resolver.task_id}")


def cluster_resolver(tf, environ=os.environ):
    """(resolver, where the cluster came from): TF_CONFIG, else SLURM's variables inside a SLURM job."""
    if environ.get("TF_CONFIG"):
        try:
            json.loads(environ["TF_CONFIG"])["cluster"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError("TF_CONFIG", environ["TF_CONFIG"][:80],
                              'JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                              '"task": {"type": "worker", "index": 0}}') from None
        return tf.distribute.cluster_resolver.TFConfigClusterResolver(), "TF_CONFIG"
    if environ.get("SLURM_JOB_ID"):  # one task per node: each worker mirrors over all GPUs of its node
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
        if tf.config.list_physical_devices("GPU"):
            return slurm(), "SLURM"
        # CPU nodes: TF 2.21's resolver asks nvidia-smi for GPUs and hands out one task per GPU (with 0 GPUs:
        # "range() arg 3 must not be zero"); give it task slots instead and leave CUDA_VISIBLE_DEVICES alone
        return slurm(gpus_per_node=64, gpus_per_task=1, auto_set_gpu=False), "SLURM"
    raise ConfigError("trainer.strategy", "multi_worker",
                      "a cluster: set TF_CONFIG in each worker's environment (README, 'Several GPUs and machines') "
                      "or run inside a SLURM job; on one machine use trainer.strategy=mirrored")


def patch_keras() -> None:
    """Keras 3.15's two failing spots under a distribution strategy (the module docstring says which);
    idempotent."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_finetune_multi_worker_patch", False):
        return
    shipped_reduce = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return shipped_reduce(values, strategy, reduction)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:  # a batch of zeros shaped like the data: drawing one from the pipeline would
            # open an iterator of its own, and the training iterator opened next would reshuffle differently
            spec = iterator.data_adapter.get_tf_dataset().element_spec
            data_batch = tree.map_structure(
                lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype), spec)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer._finetune_multi_worker_patch = True


def shard_by_data(dataset):
    """Under multi_worker, each worker takes its share of every global batch (AutoShardPolicy.DATA: the
    pipelines read files from a list, which TensorFlow's FILE sharding would split unevenly). Other
    strategies: the dataset as it is."""
    import tensorflow as tf

    if dataset is None or not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def start_early(cfg_trainer) -> Distribution | None:
    """multi_worker: the strategy created first thing in the command, before anything initialises
    TensorFlow's context (collective ops must be configured at program start-up). None otherwise."""
    return choose("multi_worker") if choice(cfg_trainer.get("strategy", "auto")) == "multi_worker" else None


def for_this_worker(cfg, output_dir: Path, distribution: Distribution | None):
    """(cfg, output_dir, scratch folder or None) for this process of a multi-worker cluster.

    Every worker runs the same command and trains in lock-step; only the chief records: the others write
    their run folder, MLflow store and feature cache into a scratch folder that is removed at the end.
    All workers extract features afresh (feature_cache auto -> refresh: a worker that found them cached
    would skip the collective pass its peers wait in) and do not resume (trainer.resume=never: a resumed
    chief and a fresh worker would hold different weights)."""
    if distribution is None or distribution.name != "multi_worker":
        return cfg, output_dir, None
    import copy
    import tempfile

    from omegaconf import OmegaConf, open_dict

    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    scratch = None
    with open_dict(cfg):
        cfg.trainer.resume = "never"
        if choice(cfg.trainer.feature_cache) == "auto":
            cfg.trainer.feature_cache = "refresh"
        if not distribution.is_chief:
            scratch = Path(tempfile.mkdtemp(prefix="finetune-worker-"))
            cfg.tracking.uri = f"sqlite:///{scratch / 'mlflow.db'}"
            cfg.tracking.artifact_location = str(scratch / "mlartifacts")
            cfg.tracking.register_model = None
            cfg.trainer.checkpoint = False
            os.environ["FINETUNE_CACHE_DIR"] = str(scratch / "cache")
            output_dir = scratch / "run"
    print(f"   multi_worker: this process is {distribution.worker} of "
          f"{distribution.replicas} replica(s); " + ("the chief: it records the run" if scratch is None else
                                                     f"not the chief: its records go to {scratch} (removed at the end)"))
    return cfg, output_dir, scratch


def whole_replica_batches(train, train_size: int, batch_size: int, steps: int):
    """(training pipeline, steps per epoch) where every batch gives each replica at least one image.

    An epoch's last batch with fewer images than replicas leaves a replica with none, whose mean loss is
    0/0: measured, the weights turn NaN in the first epoch (2 replicas, 33 images in batches of 16). Such a
    batch is left out (one image in 33 here, a different one each epoch as the data is reshuffled), as
    distributed training usually does. One replica: unchanged."""
    import tensorflow as tf

    whole_steps, drop = whole_replica_steps(train_size, batch_size, steps)
    if not drop:
        return train, steps
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return train.filter(lambda x, *_: tf.shape(x)[0] >= replicas), whole_steps


def whole_replica_steps(train_size: int, batch_size: int, steps: int) -> tuple[int, bool]:
    """(steps per epoch, whether the epoch's last batch is left out) of whole_replica_batches."""
    import math

    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    remainder = train_size % batch_size
    if replicas == 1 or remainder == 0 or remainder >= replicas:
        return steps, False
    return (max(1, train_size // batch_size) if steps == math.ceil(train_size / batch_size) else steps), True


def leave_together(distribution: Distribution | None) -> None:
    """multi_worker: every worker waits here for the others (one small all-reduce) before its process ends.
    Without it a worker that finishes first exits while the chief still saves and logs, and the chief's
    TensorFlow reports "The following tasks are unhealthy (stopped sending heartbeats)" at its exit."""
    if distribution is None or distribution.name != "multi_worker":
        return
    import tensorflow as tf

    strategy = distribution.strategy
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
