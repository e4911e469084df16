"""Typed schema for every config group, registered in Hydra's ConfigStore: the one home of defaults.

Hydra checks types and unknown keys at compose time against these dataclasses; finetune.app.checks adds
the cross-field rules. A file in conf/ holds only what differs from these defaults (tests/test_config.py
checks it), and `name` is MISSING where the option file of a group names itself (the command's defaults
list chooses the option). Data loaders called without Hydra take their defaults from here too
(finetune.data.dataset.data_options). Nothing here imports TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# what a train run returns to a sweeper and what `compare` ranks by default
OBJECTIVE_METRIC = "final_val_accuracy"


class Pooling(str, Enum):
    avg = "avg"
    max = "max"
    token = "token"  # backbone=hub with a token output (ViT, DINOv2): the class token


class FreezePolicy(str, Enum):
    all = "all"
    none = "none"
    last_n = "last_n"
    gradual = "gradual"


class BatchNormPolicy(str, Enum):
    frozen = "frozen"
    train = "train"


class HeadKind(str, Enum):
    linear = "linear"
    mlp = "mlp"
    flatten_mlp = "flatten_mlp"


class OptimizerKind(str, Enum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class CacheMode(str, Enum):
    auto = "auto"
    memory = "memory"
    off = "off"


class AugmentKind(str, Enum):
    none = "none"
    flip = "flip"
    light = "light"
    strong = "strong"


class Sampler(str, Enum):
    none = "none"
    balanced = "balanced"


class ScheduleKind(str, Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"
    plateau = "plateau"
    one_cycle = "one_cycle"


class LossKind(str, Enum):
    crossentropy = "crossentropy"
    focal = "focal"


class OnBadFile(str, Enum):
    skip = "skip"
    fail = "fail"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"


class Strategy(str, Enum):
    auto = "auto"
    none = "none"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


class LrScaling(str, Enum):
    none = "none"
    linear = "linear"


class FeatureCacheMode(str, Enum):
    auto = "auto"
    off = "off"
    refresh = "refresh"


@dataclass
class BackboneConfig:
    name: str = MISSING
    # "imagenet", null (random init) or a path to a local weights file
    weights: Optional[str] = "imagenet"
    # [height, width] or [height, width, 3]; null = the backbone's native size
    input_shape: Optional[List[int]] = None
    include_top: bool = False
    pooling: Optional[Pooling] = Pooling.avg
    # backbone=hub: a KerasHub preset name or a local preset folder (weights: preset | null | file)
    preset: Optional[str] = None


@dataclass
class FreezeConfig:
    name: FreezePolicy = MISSING
    # last_n: number of trailing blocks of the block map left trainable (also for a stage with
    # freeze: last_n and no n of its own)
    n: int = 2
    batchnorm: BatchNormPolicy = BatchNormPolicy.frozen
    # gradual: one more block trainable (from the top) every `every` epochs, up to max_blocks (null: all)
    every: int = 1
    max_blocks: Optional[int] = None
    # per-block learning-rate multipliers {block name: m} (over optimizer.layer_decay); null: none. Typed
    # Any, null by default, so that freeze.lr_mult='{block1: 0.1}' sets it (a dict default would take new
    # keys only with a leading +)
    lr_mult: Any = None


@dataclass
class HeadConfig:
    name: HeadKind = MISSING
    units: List[int] = field(default_factory=list)
    dropout: float = 0.2
    activation: str = "relu"


@dataclass
class DataCommon:
    # which source reads the data: shapes | digits | folder | tfds (set by the option file)
    source: str = MISSING
    name: str = MISSING
    seed: int = 0
    cache: CacheMode = CacheMode.auto
    cache_max_mb: int = 2048
    # training batches: none = the data as it is; balanced = oversampled so that every class is equally
    # likely in each batch (not together with trainer.class_weight=balanced: that would correct twice)
    sampler: Sampler = Sampler.none


@dataclass
class ShapesDataConfig(DataCommon):
    source: str = "shapes"
    name: str = "shapes"
    num_per_class: int = 100
    image_size: int = 64
    classes: List[str] = field(
        default_factory=lambda: ["circle", "square", "triangle", "star", "cross", "ring"])
    # fill each shape with a random two-colour texture (stripes, checker, dots, gradient or solid)
    textured: bool = False
    cache_dir: Optional[str] = None
    val_split: float = 0.2
    test_split: float = 0.1


@dataclass
class DigitsDataConfig(DataCommon):
    source: str = "digits"
    name: str = "digits"
    val_split: float = 0.2
    test_split: float = 0.1


@dataclass
class FolderDataConfig(DataCommon):
    source: str = "folder"
    name: str = "folder"
    path: str = MISSING
    val_path: Optional[str] = None
    test_path: Optional[str] = None
    val_split: float = 0.2
    test_split: float = 0.0
    # files that cannot be decoded as images (found by a pre-flight scan before training):
    # skip = leave them out (count printed, list logged as skipped_files.json); fail = stop, naming them
    on_bad_file: OnBadFile = OnBadFile.skip


@dataclass
class TfdsDataConfig(DataCommon):
    source: str = "tfds"
    # the tensorflow-datasets name
    name: str = "tf_flowers"
    train_split: str = "train[:80%]"
    val_split: str = "train[80%:90%]"
    test_split: Optional[str] = "train[90%:]"
    data_dir: Optional[str] = None
    download: bool = True
    image_key: Optional[str] = None
    label_key: Optional[str] = None


@dataclass
class FeaturesDataConfig(DataCommon):
    source: str = "features"
    name: str = "features"
    # the output folder of `finetune extract` (manifest.json + features file)
    path: str = MISSING


# data=<option> -> its schema (each conf/data/<option>.yaml extends its own)
DATA_SCHEMAS = {"shapes": ShapesDataConfig, "digits": DigitsDataConfig, "folder": FolderDataConfig,
                "tfds": TfdsDataConfig, "features": FeaturesDataConfig}


@dataclass
class OptimizerConfig:
    name: OptimizerKind = MISSING
    # a rate, or auto: the learning-rate range test (finetune.train.lr_finder) on the first stage picks it
    lr: Any = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    clipnorm: Optional[float] = None
    # per-block rates: block i of the block map counted from the top (weighted blocks) trains at lr * layer_decay**i
    layer_decay: Optional[float] = None
    # linear: optimizer.lr is for a batch of lr_reference_batch; the run uses lr * trainer.batch_size /
    # lr_reference_batch (with several replicas the global batch usually grows; finetune.train.distribute)
    lr_scaling: LrScaling = LrScaling.none
    lr_reference_batch: int = 32
    # exponential moving average of the weights (Keras' use_ema): validation and the saved model use it
    ema: bool = False
    ema_momentum: float = 0.99


@dataclass
class AugmentConfig:
    """Training-time augmentation (finetune.data.augment describes each policy)."""
    name: AugmentKind = MISSING
    # light, strong: random resized crop keeping this range of the image's area
    crop_scale: List[float] = field(default_factory=lambda: [0.6, 1.0])
    # light: rotation as a fraction of a full turn (0.03 = up to ~11 degrees), zoom fraction, colour jitter
    # (brightness, contrast, saturation; hue a tenth of it)
    rotation: float = 0.03
    zoom: float = 0.1
    color_jitter: float = 0.2
    # strong: RandAugment's operations per image and magnitude (0..1); random erasing probability
    randaugment_ops: int = 2
    randaugment_magnitude: float = 0.5
    erasing: float = 0.25
    # with any policy: MixUp / CutMix strength (alpha); 0 = off. With both, each batch gets one of them
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass
class ScheduleConfig:
    """The learning rate over a stage's optimizer updates (finetune.train.schedules has the formulas)."""
    name: ScheduleKind = MISSING
    # linear warmup from ~0 to the stage's rate over this many epochs (fractions allowed; not one_cycle)
    warmup_epochs: float = 0.0
    # cosine, one_cycle: the final rate as a fraction of the stage's; plateau: the lowest
    min_lr_ratio: float = 0.0
    # step: x gamma every every_epochs epochs of the stage
    every_epochs: int = 10
    gamma: float = 0.1
    # plateau: x factor after `patience` epochs without `monitor` improving by min_delta
    monitor: str = "val_loss"
    factor: float = 0.1
    patience: int = 2
    min_delta: float = 1e-4
    # one_cycle: rises from lr / div_factor to lr over the first pct_start of the stage, then anneals
    pct_start: float = 0.25
    div_factor: float = 25.0


@dataclass
class LossConfig:
    name: LossKind = MISSING
    # the target puts 1 - s on the true class and s / k on every class (one-hot inside; labels stay integers)
    label_smoothing: float = 0.0
    # focal: how much easy examples are down-weighted (0 = cross-entropy) and the focal alpha
    gamma: float = 2.0
    alpha: float = 0.25


@dataclass
class StageConfig:
    name: str = MISSING
    epochs: int = 1
    # null: the `freeze` group's policy; otherwise all | none | last_n (with n)
    freeze: Optional[FreezePolicy] = None
    n: Optional[int] = None
    # learning rate of this stage = optimizer.lr * lr_scale
    lr_scale: float = 1.0


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val_loss"
    patience: int = 3
    restore_best_weights: bool = True


@dataclass
class TrainerConfig:
    epochs: int = 5
    # print the model, freeze plan, data sizes, feature-cache state and an epoch-time estimate; no run
    dry_run: bool = False
    batch_size: int = 32
    seed: int = 0
    # empty: one stage of `epochs` with the `freeze` group; else the listed stages in order
    stages: List[StageConfig] = field(default_factory=list)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Re-estimate BatchNorm moving statistics of the BatchNorm layers that trained, after each stage
    bn_recalibration: bool = True
    bn_recalibration_batches: int = 100
    steps_per_epoch: Optional[int] = None
    # optimizer.lr=auto / finetune lr_find: steps of the range test
    lr_find_steps: int = 100
    # gradient accumulation: one optimizer update per this many batches (Keras' gradient_accumulation_steps);
    # schedules count updates. 1 = off
    accumulate_steps: int = 1
    # none | balanced (class c weighs n / (k * n_c)) | a mapping {class name: weight} (unlisted classes: 1)
    class_weight: Any = "none"
    verbose: int = 2
    # In a multirun, train each job that trains (part of) the backbone in a fresh process: TensorFlow/Keras
    # keep memory of every model trained in a process, which keras.backend.clear_session() does not return
    # (measured: +192 MB a job training MobileNetV2 end to end), so a long sweep in one process grows until
    # it is killed. Costs one Python/TF start-up a job (~4-8 s here). Jobs that train a head alone (frozen
    # backbone, cached features: finetune/train/head_only.py) run in the sweep's process, sharing its
    # backbone. false: every job in the sweep's process
    isolate_sweep_jobs: bool = True
    # A stage whose backbone is entirely frozen, without augmentation, trains the head on backbone
    # features computed once and kept on disk (reused by later runs and every trial of a sweep):
    # auto = use/extend the cache, refresh = recompute, off = run images through the backbone each epoch
    feature_cache: FeatureCacheMode = FeatureCacheMode.auto
    feature_cache_max_gb: float = 10.0  # least recently used entries go beyond this
    # with augmentation and a frozen backbone: cache K augmented views of each training image and draw one
    # per epoch (K backbone passes instead of one per epoch); 0 = augment afresh every epoch, no cache
    feature_cache_views: int = 0
    # auto: what finetune.train.compute measured fastest for this device class and backbone family
    precision: Precision = Precision.auto
    jit_compile: str = "auto"  # auto | true | false (XLA)
    # tf.distribute: auto (mirrored with >1 GPU, else none) | none | mirrored (GPUs, or logical CPUs:
    # FINETUNE_LOGICAL_CPUS=N) | multi_worker (TF_CONFIG or SLURM). batch_size is the global batch
    strategy: Strategy = Strategy.auto
    # A checkpoint at every epoch end (run dir/checkpoint/): a killed run continues from its last
    # completed epoch. resume: auto = the same command continues this config's interrupted run;
    # never = always a new run; <run dir> = continue that run
    checkpoint: bool = True
    resume: str = "auto"


@dataclass
class TrackingConfig:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///<cwd>/mlflow.db
    uri: Optional[str] = None
    # null: <cwd>/mlartifacts for new experiments on a local store
    artifact_location: Optional[str] = None
    experiment: str = "finetune"
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)
    log_model: bool = True
    # register the logged model in the MLflow model registry under this name (models:/<name>/<version>)
    register_model: Optional[str] = None


@dataclass
class TrainConfig:
    backbone: BackboneConfig = MISSING
    freeze: FreezeConfig = MISSING
    head: HeadConfig = MISSING
    data: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    augment: AugmentConfig = MISSING
    schedule: ScheduleConfig = MISSING
    loss: LossConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING


class Tta(str, Enum):
    none = "none"
    flip = "flip"
    flip_crops = "flip_crops"


class FeatureFormat(str, Enum):
    npz = "npz"
    parquet = "parquet"


class Quantize(str, Enum):
    none = "none"
    float16 = "float16"
    dynamic = "dynamic"
    int8 = "int8"


@dataclass
class ClassifyOptions:
    top_k: int = 5
    # path to an imagenet_class_index.json; null = the one Keras downloads on first use
    class_index: Optional[str] = None
    # write the table to this .csv or .json file as well
    output: Optional[str] = None
    batch_size: int = 16


@dataclass
class ClassifyConfig:
    backbone: BackboneConfig = MISSING
    tracking: TrackingConfig = MISSING
    # image files, folders or globs: images=[dog.jpg,cat.png] or images=photos/
    images: Any = MISSING
    classify: ClassifyOptions = field(default_factory=ClassifyOptions)


@dataclass
class ExtractOptions:
    # null = the backbone's pooled output; else a layer name of the backbone (e.g. fc2, avg_pool)
    layer: Optional[str] = None
    format: FeatureFormat = FeatureFormat.npz
    # output folder; null = the run's output directory
    output: Optional[str] = None
    batch_size: int = 32


@dataclass
class ExtractConfig:
    backbone: BackboneConfig = MISSING
    data: Any = MISSING
    tracking: TrackingConfig = MISSING
    # unlabelled images instead of a dataset (files, folders or globs); null = use `data`
    images: Any = None
    extract: ExtractOptions = field(default_factory=ExtractOptions)


@dataclass
class PredictOptions:
    top_k: int = 3
    output: Optional[str] = None
    batch_size: int = 32
    # test-time augmentation: probabilities averaged over views (none | flip | flip_crops; finetune.model.tta)
    tta: Tta = Tta.none


@dataclass
class PredictConfig:
    # an MLflow run id, a models:/<name>/<version> or models:/<name>@<alias> URI, or a path to a .keras file
    model: str = MISSING
    images: Any = MISSING
    tracking: TrackingConfig = MISSING
    predict: PredictOptions = field(default_factory=PredictOptions)
    # Keras safe mode: a .keras file holding Python code (a Lambda layer) is refused; false loads it
    # and runs that code: only for files from a source you trust
    model_safe_mode: bool = True


@dataclass
class EvaluateOptions:
    # which split of `data` to evaluate: test | val | train
    split: str = "test"
    batch_size: int = 32
    top_k: int = 5
    # log into the model's own run when it has one (true), else / or always a new evaluation run
    log_to_model_run: bool = True
    # test-time augmentation (none | flip | flip_crops): the metrics with it, and without it as *_without_tta
    tta: Tta = Tta.none


@dataclass
class EvaluateConfig:
    model: str = MISSING
    data: Any = MISSING
    tracking: TrackingConfig = MISSING
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    # Keras safe mode: a .keras file holding Python code (a Lambda layer) is refused; false loads it
    # and runs that code: only for files from a source you trust
    model_safe_mode: bool = True


@dataclass
class ExportOptions:
    formats: List[str] = field(default_factory=lambda: ["keras", "saved_model", "tflite"])
    quantize: Quantize = Quantize.none
    # output folder; null = the command's output directory
    output: Optional[str] = None
    # images from the data used for int8 calibration and for the agreement check
    representative_samples: int = 64
    check_samples: int = 32


@dataclass
class ExportConfig:
    model: str = MISSING
    # null: the data the model was trained on (its saved config), else this data group
    data: Any = None
    tracking: TrackingConfig = MISSING
    export: ExportOptions = field(default_factory=ExportOptions)
    # Keras safe mode: a .keras file holding Python code (a Lambda layer) is refused; false loads it
    # and runs that code: only for files from a source you trust
    model_safe_mode: bool = True


@dataclass
class CompareOptions:
    # the sweep's parent run id; null = every (non-parent) run of the experiment
    sweep: Optional[str] = None
    # null = tracking.experiment
    experiment: Optional[str] = None
    metric: str = OBJECTIVE_METRIC
    limit: int = 50
    # also write the table to this .csv file
    output: Optional[str] = None
    # register the best run's model under this name in the MLflow model registry and point `alias` at
    # that version: then model=models:/<register>@<alias> (and mlflow models serve -m the same URI)
    register: Optional[str] = None
    alias: str = "champion"


@dataclass
class CompareConfig:
    tracking: TrackingConfig = MISSING
    compare: CompareOptions = field(default_factory=CompareOptions)


class CacheAction(str, Enum):
    list = "list"
    clear = "clear"


@dataclass
class CacheOptions:
    action: CacheAction = CacheAction.list
    # clear only this entry (a key from `finetune cache`); null = every entry
    key: Optional[str] = None


@dataclass
class CacheConfig:
    cache: CacheOptions = field(default_factory=CacheOptions)


class OptunaSampler(str, Enum):
    tpe = "tpe"
    random = "random"
    grid = "grid"


class Direction(str, Enum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class OptunaSweeperConfig:
    """hydra/sweeper=finetune_optuna (see finetune.sweep.optuna_study for the search-space grammar)."""
    _target_: str = "hydra_plugins.finetune_optuna_sweeper.optuna_sweeper.FinetuneOptunaSweeper"
    sampler: OptunaSampler = OptunaSampler.tpe
    seed: Optional[int] = 0
    direction: Direction = Direction.maximize  # the jobs return final_val_accuracy
    study_name: str = "finetune-${tracking.experiment}"
    storage: Optional[str] = "sqlite:///optuna.db"  # relative to the working dir; null: in memory
    n_trials: int = 20  # trials the study should have finished, counting earlier runs of it
    n_jobs: int = 1  # trials launched together (parallel with a parallel launcher)
    max_consecutive_failures: int = 5
    params: Dict[str, str] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas. Groups with one schema are typed by TrainConfig's fields; each `data`
    option has its own schema, which its conf/data/<name>.yaml extends."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for command, node in {"classify": ClassifyConfig, "extract": ExtractConfig, "predict": PredictConfig,
                          "evaluate": EvaluateConfig, "export": ExportConfig,
                          "compare": CompareConfig, "cache": CacheConfig}.items():
        cs.store(name=f"{command}_schema", node=node)
    for name, node in DATA_SCHEMAS.items():
        cs.store(name=f"data_schema_{name}", node=node)
    cs.store(group="hydra/sweeper", name="finetune_optuna", node=OptunaSweeperConfig, provider="finetune")


def choice(value):
    """The plain string of an enum-typed option (OmegaConf returns the Enum member)."""
    return value.value if isinstance(value, Enum) else value
