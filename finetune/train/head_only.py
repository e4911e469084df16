"""Which `finetune train` runs train a head alone, on features that stay the same from epoch to epoch:
decided from the config, before TensorFlow is imported (a sweep runs such jobs in its own process).

A head-only run trains on a features file (data=features), or on a frozen backbone's cached features:
every stage freezes the whole backbone, BatchNorm follows it, the feature cache is on, and the inputs do
not change between epochs (no augmentation, or K cached augmented views; never MixUp/CutMix)."""
from __future__ import annotations

from finetune.config.schema import choice


def trains_head_only(cfg) -> bool:
    if str(cfg.data.get("source", "")) == "features":
        return True
    trainer, augment = cfg.trainer, cfg.get("augment")
    if choice(trainer.feature_cache) == "off" or choice(trainer.get("strategy", "auto")) == "multi_worker":
        return False
    if choice(cfg.freeze.batchnorm) != "frozen" or any(p != "all" for p in stage_policies(cfg)):
        return False
    if augment is None:
        return True
    mixing = float(augment.get("mixup", 0) or 0) > 0 or float(augment.get("cutmix", 0) or 0) > 0
    return not mixing and (choice(augment.name) == "none" or int(trainer.get("feature_cache_views", 0)) > 0)


def stage_policies(cfg) -> list[str]:
    """The freeze policy of every stage (trainer.stages, or the one stage of the freeze group)."""
    default = choice(cfg.freeze.name)
    return [choice(s.freeze) if s.get("freeze") is not None else default for s in cfg.trainer.stages] or [default]
