"""Every cross-field rule of a composed config, in one module, checked before TensorFlow is imported or
anything is downloaded (the CLI's precheck runs `validate_command`; train runs its checks again in-process).

Hydra already rejects unknown keys, wrong types and unknown choices against the schema
(finetune/config/schema.py); these are the rules that need the backbone registry, a weights file, or
more than one key. What can only be checked with the data in hand (an empty split, a tfds split the
dataset lacks, a bad image file) is checked by finetune.data when it reads the data.
"""
from __future__ import annotations

import numbers
from pathlib import Path

from finetune.config.schema import choice
from finetune.data import shapes
from finetune.data.dataset import cfg_get, data_options
from finetune.data.sources import source_of
from finetune.data.tfds import dataset_name
from finetune.errors import ConfigError
from finetune.model.backbones import BackboneSpec, spec_for

WEIGHTS_SUFFIXES = (".h5", ".keras")
# The split rule: val_split + test_split at most this, so that at least 10% of each class's images train.
MAX_HELD_OUT = 0.9


def validate_train(cfg) -> BackboneSpec:
    """Raise ConfigError on the first problem; returns the backbone spec."""
    spec = spec_for(cfg.backbone)
    if cfg.data.source == "features":  # the backbone is the one the features were extracted with
        if cfg.trainer.stages:
            raise ConfigError("trainer.stages", "[...]", "no stages with data=features (no backbone trains)")
    else:
        check_backbone(cfg.backbone, spec, top_pooling=False)  # check_head refuses include_top=true
        check_head(cfg.head, cfg.backbone)
        check_freeze(cfg, spec)
    check_trainer(cfg.trainer, cfg.optimizer)
    check_schedule(cfg.schedule)
    check_loss(cfg.loss)
    check_class_weight(cfg.trainer.class_weight, cfg_get(cfg.data, "sampler", "none"))
    check_feature_views(cfg)
    check_data(cfg.data)
    return spec


def check_backbone(cfg_backbone, spec: BackboneSpec, top_pooling: bool = True) -> None:
    """input_shape / include_top / pooling / weights of the `backbone` group (`top_pooling=False`: the
    command refuses include_top=true itself, with its own message)."""
    shape = cfg_backbone.input_shape
    weights = cfg_backbone.weights
    if spec.family == "hub":
        return check_hub_backbone(cfg_backbone, spec)
    if choice(cfg_backbone.pooling) == "token":
        raise ConfigError("backbone.pooling", "token", "avg, max or null (token is for backbone=hub presets "
                                                       "whose output is tokens, e.g. ViT)")
    if shape is not None:
        shape = list(shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3):
            raise ConfigError("backbone.input_shape", shape, "[height, width] or [height, width, 3]")
        if min(shape[:2]) < spec.min_size:
            raise ConfigError("backbone.input_shape", shape,
                              f"each side >= {spec.min_size}, the smallest input {spec.name} accepts")
    native = shape is None or tuple(shape[:2]) == (spec.native_size, spec.native_size)
    if weights == "imagenet" and not native:
        if cfg_backbone.include_top:
            raise ConfigError("backbone.input_shape", shape,
                              f"null or [{spec.native_size}, {spec.native_size}] with include_top=true "
                              "and imagenet weights (the classifier is tied to the native size)")
        if spec.native_size_required_for_weights:
            raise ConfigError("backbone.input_shape", shape,
                              f"null or [{spec.native_size}, {spec.native_size}]: {spec.name}'s "
                              "imagenet weights exist only at its native size")
        if spec.weight_sizes and (shape[0] != shape[1] or shape[0] not in spec.weight_sizes):
            raise ConfigError("backbone.input_shape", shape,
                              f"a square size in {list(spec.weight_sizes)} for {spec.name}'s imagenet weights")
    if weights not in (None, "imagenet"):
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise ConfigError("backbone.weights", weights,
                              "'imagenet', null, or the path of an existing weights file")
        if not path.name.endswith(WEIGHTS_SUFFIXES):
            raise ConfigError("backbone.weights", weights,
                              "a Keras weights file (.weights.h5, .h5) or a .keras model")
        from finetune.model.weights_file import check as check_weights_file  # h5py, no TensorFlow

        check_weights_file("backbone.weights", weights, spec, bool(cfg_backbone.include_top))
    if top_pooling and cfg_backbone.include_top and cfg_backbone.pooling is not None:
        raise ConfigError("backbone.pooling", choice(cfg_backbone.pooling),
                          "null with backbone.include_top=true (Keras ignores pooling when the "
                          "classifier is included: the output is the class probabilities)")


def check_hub_backbone(cfg_backbone, spec: BackboneSpec) -> None:
    """backbone=hub: preset weights, null or a file; no ImageNet classifier; a fixed-size preset's size."""
    from finetune.model import hub

    weights, shape = cfg_backbone.weights, cfg_backbone.input_shape
    if cfg_backbone.include_top:
        raise ConfigError("backbone.include_top", True, "false with backbone=hub (a KerasHub backbone has no "
                                                        "classifier; train adds a head)")
    if weights == "imagenet":
        raise ConfigError("backbone.weights", weights, f"{hub.WEIGHTS} (the preset's own weights), null or a "
                                                       "weights file, with backbone=hub")
    if weights not in (None, hub.WEIGHTS) and not Path(str(weights)).expanduser().is_file():
        raise ConfigError("backbone.weights", weights, f"{hub.WEIGHTS}, null, or the path of an existing "
                                                       "weights file (backbone.weights.h5 from a hub run)")
    if shape is not None:
        shape = list(shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] != 3) or min(shape[:2]) < spec.min_size:
            raise ConfigError("backbone.input_shape", shape, f"[height, width] with each side >= {spec.min_size}")
        if (spec.native_size_required_for_weights and weights == hub.WEIGHTS
                and tuple(shape[:2]) != (spec.native_size, spec.native_size)):
            raise ConfigError("backbone.input_shape", shape,
                              f"null or [{spec.native_size}, {spec.native_size}]: the preset's weights are "
                              "built for that image size (its position embeddings are fixed)")


def check_head(cfg_head, cfg_backbone) -> None:
    kind = choice(cfg_head.name)
    if cfg_backbone.include_top:
        raise ConfigError("backbone.include_top", True,
                          "false for train (a new head replaces the ImageNet classifier; "
                          "`finetune classify` uses the ImageNet classes)")
    if kind in ("linear", "mlp") and cfg_backbone.pooling is None:
        raise ConfigError("backbone.pooling", None,
                          f"avg or max for head={kind}, which needs pooled features "
                          "(or head=flatten_mlp for unpooled feature maps)")
    if kind == "flatten_mlp" and not cfg_head.units:
        raise ConfigError("head.units", list(cfg_head.units), "at least one hidden size, e.g. [1024]")
    if not 0.0 <= cfg_head.dropout < 1.0:
        raise ConfigError("head.dropout", cfg_head.dropout, "a rate in [0, 1)")
    if any(u < 1 for u in cfg_head.units):
        raise ConfigError("head.units", list(cfg_head.units), "positive layer sizes")


def check_freeze(cfg, spec: BackboneSpec) -> None:
    """The freeze keys against the block map (a hub preset's blocks are known once it is built: train
    checks again then, see finetune.train.run)."""
    if not spec.blocks:
        positive_int("freeze.every", cfg.freeze.every)
        return
    blocks = len(spec.blocks)
    checks = [("freeze.n", choice(cfg.freeze.name), cfg.freeze.n)]
    checks += [(f"trainer.stages[{i}].n", choice(s.freeze) if s.freeze is not None else choice(cfg.freeze.name),
                s.n if s.n is not None else cfg.freeze.n) for i, s in enumerate(cfg.trainer.stages)]
    positive_int("freeze.every", cfg.freeze.every)
    from omegaconf import DictConfig

    lr_mult = cfg.freeze.lr_mult
    if lr_mult is not None and not isinstance(lr_mult, (dict, DictConfig)):
        raise ConfigError("freeze.lr_mult", lr_mult, "a mapping of block names to multipliers, e.g. '{block1: 0.1}'")
    for block, value in (lr_mult or {}).items():
        if block not in spec.blocks:
            raise ConfigError(f"freeze.lr_mult.{block}", value, f"a block of {spec.name}'s block map: "
                                                                f"{', '.join(spec.blocks)}")
        _in_range(f"freeze.lr_mult.{block}", value, 0, float("inf"), "a multiplier > 0", low_open=True)
    if cfg.optimizer.layer_decay is not None:
        _in_range("optimizer.layer_decay", cfg.optimizer.layer_decay, 0, 1, "a factor in (0, 1], e.g. 0.7",
                  low_open=True)
    if cfg.freeze.max_blocks is not None and not 1 <= cfg.freeze.max_blocks <= blocks:
        raise ConfigError("freeze.max_blocks", cfg.freeze.max_blocks,
                          f"null (all) or 1..{blocks}, the blocks in {spec.name}'s block map")
    for key, policy, n in checks:
        if policy == "last_n" and not 1 <= n <= blocks:
            raise ConfigError(key, n, f"1..{blocks}, the number of blocks in {spec.name}'s block map "
                                      f"({', '.join(spec.blocks)})")


def check_freeze_built(cfg, parts) -> None:
    """check_freeze once the block map exists, for a backbone whose blocks were not known before (hub)."""
    if not parts.spec.blocks:
        import dataclasses

        check_freeze(cfg, dataclasses.replace(parts.spec, blocks=tuple(name for name, _ in parts.blocks)))


def check_trainer(cfg_trainer, cfg_optimizer) -> None:
    if str(cfg_trainer.jit_compile).lower() not in ("auto", "true", "false"):
        raise ConfigError("trainer.jit_compile", cfg_trainer.jit_compile, "auto, true or false")
    if cfg_trainer.batch_size < 1:
        raise ConfigError("trainer.batch_size", cfg_trainer.batch_size, "an integer >= 1")
    if not cfg_trainer.stages and cfg_trainer.epochs < 1:
        raise ConfigError("trainer.epochs", cfg_trainer.epochs, "an integer >= 1")
    for i, stage in enumerate(cfg_trainer.stages):
        if stage.epochs < 1:
            raise ConfigError(f"trainer.stages[{i}].epochs", stage.epochs, "an integer >= 1")
        if stage.lr_scale <= 0:
            raise ConfigError(f"trainer.stages[{i}].lr_scale", stage.lr_scale, "a number > 0")
    lr = cfg_optimizer.lr
    if str(lr) != "auto" and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or lr <= 0):
        raise ConfigError("optimizer.lr", lr, "a learning rate > 0, or auto (the range test picks it)")
    positive_int("trainer.lr_find_steps", cfg_trainer.lr_find_steps)
    positive_int("trainer.accumulate_steps", cfg_trainer.accumulate_steps)
    _in_range("optimizer.ema_momentum", cfg_optimizer.ema_momentum, 0, 1, "a momentum in (0, 1), e.g. 0.99",
              low_open=True, high_open=True)
    if cfg_trainer.steps_per_epoch is not None and cfg_trainer.steps_per_epoch < 1:
        raise ConfigError("trainer.steps_per_epoch", cfg_trainer.steps_per_epoch, "null or an integer >= 1")


def _in_range(key: str, value, low: float, high: float, rule: str, low_open=False, high_open=False) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        raise ConfigError(key, value, rule)


def check_schedule(cfg_schedule) -> None:
    """The `schedule` group's values (finetune.train.schedules)."""
    inf = float("inf")
    _in_range("schedule.warmup_epochs", cfg_schedule.warmup_epochs, 0, inf, "a number of epochs >= 0, e.g. 1")
    _in_range("schedule.min_lr_ratio", cfg_schedule.min_lr_ratio, 0, 1, "a fraction of the rate in [0, 1]")
    _in_range("schedule.gamma", cfg_schedule.gamma, 0, 1, "a factor in (0, 1], e.g. 0.1", low_open=True)
    _in_range("schedule.factor", cfg_schedule.factor, 0, 1, "a factor in (0, 1), e.g. 0.3", low_open=True,
              high_open=True)
    _in_range("schedule.pct_start", cfg_schedule.pct_start, 0, 1, "a fraction in (0, 1), e.g. 0.25",
              low_open=True, high_open=True)
    _in_range("schedule.div_factor", cfg_schedule.div_factor, 1, inf, "a number >= 1, e.g. 25")
    _in_range("schedule.min_delta", cfg_schedule.min_delta, 0, inf, "a number >= 0")
    positive_int("schedule.every_epochs", cfg_schedule.every_epochs)
    positive_int("schedule.patience", cfg_schedule.patience)
    if choice(cfg_schedule.name) == "plateau" and not str(cfg_schedule.monitor).startswith("val_"):
        raise ConfigError("schedule.monitor", cfg_schedule.monitor,
                          "a validation metric the run logs: val_loss or val_accuracy")


def check_loss(cfg_loss) -> None:
    _in_range("loss.label_smoothing", cfg_loss.label_smoothing, 0, 1, "a fraction in [0, 1), e.g. 0.1",
              high_open=True)
    _in_range("loss.gamma", cfg_loss.gamma, 0, float("inf"), "a number >= 0, e.g. 2")
    _in_range("loss.alpha", cfg_loss.alpha, 0, 1, "a weight in (0, 1], e.g. 0.25", low_open=True)


def check_feature_views(cfg) -> None:
    views = cfg.trainer.feature_cache_views
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError("trainer.feature_cache_views", views, "an integer >= 0 (0: augment every epoch)")
    if views and (cfg.augment.mixup or cfg.augment.cutmix):
        raise ConfigError("trainer.feature_cache_views", views, "0 with augment.mixup/cutmix: mixing cached "
                          "features is not mixing images (MixUp/CutMix need the images every epoch)")


def check_class_weight(value, sampler) -> None:
    """trainer.class_weight: none | balanced | {class name: weight > 0}; the class names themselves are
    checked against the data when it is read (finetune.train.imbalance)."""
    from omegaconf import DictConfig

    rule = "none, balanced, or a mapping of class names to weights > 0, e.g. '{cat: 2.0, dog: 1.0}'"
    if isinstance(value, (dict, DictConfig)):
        for name, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight <= 0:
                raise ConfigError(f"trainer.class_weight.{name}", weight, "a weight > 0")
    elif value is not None and str(value) not in ("none", "balanced"):
        raise ConfigError("trainer.class_weight", value, rule)
    if str(value) == "balanced" and choice(sampler) == "balanced":
        raise ConfigError("trainer.class_weight", value, "none with data.sampler=balanced (balanced batches "
                          "and balanced weights together correct the imbalance twice): choose one")


def check_split(val_split, test_split, val_path=None) -> None:
    """The split rule (the one home of it) for data that finetune splits itself (shapes, digits, folder):
    val_split and test_split are fractions of each class's images in [0, 1), together at most
    MAX_HELD_OUT (0.9) so that at least 10% of every class trains, and val_split > 0 unless a separate
    validation folder (data.val_path) is given."""
    for key, value in (("data.val_split", val_split), ("data.test_split", test_split)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ConfigError(key, value, "a fraction in [0, 1), e.g. 0.2")
    if val_split + test_split > MAX_HELD_OUT + 1e-9:  # 1e-9: 0.6 + 0.3 is 0.8999999999999999, 0.5 + 0.4 is 0.9
        raise ConfigError("data.val_split", val_split,
                          f"val_split + test_split <= {MAX_HELD_OUT} (test_split={test_split}), so that at "
                          f"least {1 - MAX_HELD_OUT:.0%} of each class's images train")
    if val_split == 0 and not val_path:
        raise ConfigError("data.val_split", val_split, "> 0, or a separate data.val_path")


def _check_fractions(opts) -> None:
    check_split(opts.val_split, opts.test_split, getattr(opts, "val_path", None))


def _check_shapes(opts) -> None:
    shapes.check_options(opts.classes, opts.num_per_class, opts.image_size)
    _check_fractions(opts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tfds_split_spec(key: str, value, required: bool) -> None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ConfigError(f"data.{key}", value, "a tfds split like 'train[80%:90%]'")
        return
    if not isinstance(value, str) or _is_number(value):
        raise ConfigError(f"data.{key}", value, "a tfds split string like 'train[80%:90%]' (tfds splits "
                          "are strings, not fractions)")


def _check_tfds(opts) -> None:
    dataset_name(opts)  # a name is given (the catalog is looked up when the data is read)
    for key, required in (("train_split", True), ("val_split", True), ("test_split", False)):
        _tfds_split_spec(key, getattr(opts, key), required)
    if not isinstance(opts.download, bool):
        raise ConfigError("data.download", opts.download, "true or false")


# data.source -> its rules (beyond the schema's types and choices)
DATA_CHECKS = {"shapes": _check_shapes, "digits": _check_fractions, "folder": _check_fractions,
               "tfds": _check_tfds}


def check_data(cfg_data) -> None:
    """The `data` group's rules, for every command that reads a dataset (data=features: none here; its
    manifest is checked when it is read)."""
    if cfg_get(cfg_data, "source", None) == "features":
        return
    source = source_of(cfg_data)
    opts = data_options(cfg_data, source)
    for key in ("seed", "cache_max_mb"):
        value = getattr(opts, key)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ConfigError(f"data.{key}", value, "an integer >= 0")
    DATA_CHECKS[source](opts)


def positive_int(key: str, value) -> int:
    """`value` if it is an integer >= 1, else a ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "an integer >= 1")
    return int(value)


def check_extract(cfg) -> None:
    check_backbone(cfg.backbone, spec_for(cfg.backbone))
    positive_int("extract.batch_size", cfg.extract.batch_size)
    if not cfg.images:
        check_data(cfg.data)


def check_evaluate(cfg) -> None:
    check_data(cfg.data)


def check_export(cfg) -> None:
    if cfg.data is not None:  # null: the data the model was trained on, checked when it trained
        check_data(cfg.data)


def _check_classify(cfg) -> None:
    check_classify(cfg, spec_for(cfg.backbone))


# what a command's required argument (MISSING in the schema) takes, for its one-line error
REQUIRED = {
    "images": "image files, folders or globs, e.g. images=[a.jpg,b.png] or images=photos/",
    "model": "a model: model=<MLflow run id | models:/<name>/<version> | models:/<name>@<alias> | path/to/model.keras>",
}


def check_required(cfg) -> None:
    """The command's required arguments (images=, model=) are given: one line naming the first missing
    one, instead of OmegaConf's traceback when the command reads it. (A group's required key, such as
    data.path, is checked by what reads it, which knows whether it is used.)"""
    from omegaconf import OmegaConf

    for key in (k for k in cfg if k != "hydra"):  # hydra: Hydra's own, filled while it runs
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(key, "???", REQUIRED.get(key, f"a value: set {key}=..."))


# command -> the checks of its composed config (commands without an entry have no cross-field rules)
COMMAND_CHECKS = {"train": validate_train, "lr_find": validate_train, "extract": check_extract, "classify": _check_classify,
                  "evaluate": check_evaluate, "export": check_export}


def validate_command(command: str, cfg) -> None:
    """The checks a command makes of its composed config before it starts, run by the CLI's precheck (so
    a bad value costs well under a second and Hydra creates nothing). Pure Python; h5py for a weights file."""
    check_required(cfg)
    check = COMMAND_CHECKS.get(command)
    if check is not None:
        check(cfg)


def check_classify(cfg, spec) -> None:
    if spec.family == "hub":
        raise ConfigError("backbone", "hub", "a keras.applications backbone for classify (its ImageNet "
                                             "classifier labels the images); hub presets: train or extract")
    if not cfg.backbone.include_top:
        raise ConfigError("backbone.include_top", False,
                          "true for classify (the ImageNet classifier is what labels the images)")
    check_backbone(cfg.backbone, spec)
    if cfg.classify.top_k < 1:
        raise ConfigError("classify.top_k", cfg.classify.top_k, "an integer >= 1")
    if cfg.classify.output and Path(cfg.classify.output).suffix not in (".csv", ".json"):
        raise ConfigError("classify.output", cfg.classify.output, "a .csv or .json file name")
