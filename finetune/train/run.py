"""A training run, step by step, inside an active MLflow run (finetune.commands.train opens it).

    prepare data -> build the model -> plan the stages -> for each stage: freeze, compile, fit (on images,
    or on cached features when the backbone does not change) -> recalibrate BatchNorm -> evaluate ->
    save and record

`train_on_images` is that order; `train_on_feature_file` (data=features) runs the same steps on vectors
that `finetune extract` wrote, then reassembles the image model."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from finetune.config.schema import choice
from finetune.data.augment import mixes
from finetune.model import batchnorm
from finetune.app.checks import check_freeze_built
from finetune.model.assemble import Parts, assemble, build_parts, input_shape_of, weights_source
from finetune.model.freeze import apply_freeze, trained_batchnorm_layers, unfreeze_steps
from finetune.train.cached_features import augmented_views, cached_features, head_on_features, uses_feature_cache
from finetune.train.callbacks import stage_callbacks
from finetune.train.compute import ComputeChoice, choose, device_class
from finetune.train.evaluate import evaluate_model
from finetune.train.inputs import Inputs, feature_inputs, image_inputs
from finetune.train.optim import compile_model
from finetune.train.progress import Progress
from finetune.train.preview import record_augmentation_preview
from finetune.train.record import Setup, record_setup, record_stage, save_and_record, weights_description
from finetune.train import distribute, head_reuse, imbalance, layer_lr, schedules
from finetune.train.head_only import stage_policies
from finetune.train.stages import Stage, build_optimizer, fit_stage, plan_stages


@dataclass
class Run:
    """What the steps of one run share."""
    cfg: Any
    out: Path
    dataset: Any
    parts: Parts
    images: Inputs
    compute: ComputeChoice
    progress: Progress
    train_counts: Any = None  # training images per class (None: unknown without a pass over the data)
    class_weight: dict | None = None
    block_lr: dict | None = None  # {block name: learning-rate multiplier} (layer decay, freeze.lr_mult)
    head_key: str | None = None  # finetune.train.head_reuse: the key its head is kept under

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.class_names)


@dataclass
class Fitted:
    """What a stage trained (the image model, or the head on cached features), on what, and the image
    model it belongs to (the same layers: what is saved)."""
    model: Any
    inputs: Inputs
    image_model: Any


def train_on_images(cfg, spec, dataset, output_dir: Path, resume: dict | None = None) -> dict:
    """The whole run; returns the final metrics. `resume`: a loaded checkpoint to continue from."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with keras_session(cfg, spec) as compute:
        images = image_inputs(cfg, dataset, input_shape_of(cfg.backbone, spec))
        shared = shared_backbone(cfg, compute)
        head_key = head_reuse.key_of(cfg, shared, len(dataset.class_names), len(stage_policies(cfg))) \
            if resume is None else None
        parts = build_parts(cfg.backbone, cfg.head, spec, len(dataset.class_names), shared_key=shared,
                            head_seed=int(cfg.trainer.seed), head_layers=head_reuse.kept_layers(head_key))
        check_freeze_built(cfg, parts)
        run = Run(cfg, out, dataset, parts, images, compute, Progress.for_run(cfg, parts, out), head_key=head_key)
        run.train_counts = training_counts(dataset, images, needed=str(cfg.trainer.class_weight) == "balanced")
        run.class_weight = record_class_weight(cfg, run.classes, run.train_counts)
        run.block_lr = record_block_lr(cfg, parts.blocks)
        record_setup(cfg, out, dataset, image_setup(run))
        record_augmentation_preview(run)
        epoch, done, inside = run.progress.restore(resume) if resume else (0, 0, None)
        fitted = None
        steps = unfreeze_steps(parts.blocks)
        for index in range(len(plan_stages(cfg, unfreeze_steps=steps))):
            if index < done:  # finished before the interruption
                continue
            stage = plan_stages(cfg, run.progress.lr_found, steps)[index]  # optimizer.lr=auto: found in stage 1
            fitted = train_stage(run, index, stage, epoch, inside if index == done else None)
            epoch = run.progress.epochs_done
            run.progress.save(index + 1, epoch, epoch, {}, None)  # the next stage starts afresh
        if fitted is None:  # interrupted after the last stage: only the end is left
            model = assemble(parts)
            compile_model(model, cfg.optimizer, 1e-3, len(run.classes), cfg_loss=cfg.loss,  # evaluation only
                          one_hot=mixes(cfg.augment))
            fitted = Fitted(model, images, model)
        metrics = evaluate_model(fitted.model, fitted.inputs, run.classes, out, f"{spec.name} on {dataset.name}",
                                 train_counts=run.train_counts)
        save_and_record(cfg, out, fitted.image_model, parts.backbone, run.progress,
                        head_model=None if fitted.model is fitted.image_model else fitted.model)
        run.progress.discard()
    return metrics


def shared_backbone(cfg, compute: ComputeChoice) -> str | None:
    """The backbone_pool key of a run that trains a head alone (its backbone never changes, so the next
    such run in this process, a sweep's next trial, reuses it); None: build this run's own."""
    from finetune.model import backbone_pool
    from finetune.train.head_only import trains_head_only

    if not trains_head_only(cfg):
        return None
    placement = compute.distribution.name if compute.distribution is not None else "one device"
    return backbone_pool.key_of(cfg.backbone, int(cfg.trainer.seed), f"{compute.keras_policy} {placement}")


def train_stage(run: Run, index: int, stage: Stage, first_epoch: int, resume: dict | None) -> Fitted:
    """Freeze, compile, fit with the stage's callbacks, then re-estimate BatchNorm statistics."""
    cfg, parts = run.cfg, run.parts
    ready = prepare_stage(run, stage)
    fitted, model, bn_layers = ready.fitted, ready.fitted.image_model, ready.bn_layers
    run.progress.begin_stage(stage.name, first_epoch, changes_backbone=ready.backbone_trains or bool(bn_layers))
    if math.isnan(stage.lr):  # optimizer.lr=auto: the range test on this stage as configured
        stage = find_learning_rate(cfg, run.out, run.progress, stage, fitted.model, fitted.inputs, run.class_weight)
    record_stage(cfg, run.out, index, stage, ready.plan, model, parts.head, parts.spec.name)
    start = run.progress.restore_into(fitted.model, resume)
    schedule = stage_schedule(cfg, stage, first_epoch, fitted.inputs.steps_per_epoch, resume)
    print(f"\n-- stage {index + 1} '{stage.name}': {stage.epochs} epoch(s), lr={stage.lr:g}, {stage.describe()}, "
          f"{schedules.describe(cfg.schedule)}" + (f"; continuing at epoch {start + 1}" if start > first_epoch else ""))
    history = fit_stage(fitted.model, fitted.inputs.train_from_epoch(start - first_epoch), fitted.inputs.val,
                        first_epoch=start, epochs=stage.epochs - (start - first_epoch),
                        callbacks=stage_callbacks(cfg.trainer, index, first_epoch, run.progress, schedule,
                                                  ema=bool(cfg.optimizer.ema)),
                        steps_per_epoch=fitted.inputs.steps_per_epoch, verbose=int(cfg.trainer.verbose),
                        class_weight=run.class_weight, small_graph=fitted.model is not model)
    record_schedule(run.out, index, stage, schedule)
    last_epoch = run.progress.add(history, start)
    if bn_layers:
        recalibrate(run, model, bn_layers, last_epoch - 1)
    return fitted


def training_counts(dataset, images: Inputs, needed: bool):
    """Training images per class: from the split's labels, or (tfds, when `needed`) one pass over them."""
    import numpy as np

    k = len(dataset.class_names)
    if dataset.train.labels is not None:
        return imbalance.label_counts(dataset.train.labels, k)
    if not needed:
        return None
    print("   counting the training labels (one pass over the training split) for the class weights")
    labels = [np.asarray(y) for _, y in images.train_plain]
    return imbalance.label_counts(np.concatenate(labels), k)


def record_block_lr(cfg, blocks) -> dict:
    """optimizer.layer_decay / freeze.lr_mult as {block: multiplier}, printed and logged as lr_mult.<block>."""
    from finetune import tracking

    multipliers = layer_lr.block_multipliers(blocks, cfg.optimizer.get("layer_decay"), cfg.freeze.get("lr_mult"))
    if multipliers:
        tracking.log_params({f"lr_mult.{name}": round(m, 6) for name, m in multipliers.items()})
        print("   per-block learning rates (x lr): " + ", ".join(f"{n}={m:.3g}" for n, m in multipliers.items()))
    return multipliers


def record_class_weight(cfg, classes: list[str], counts) -> dict | None:
    """trainer.class_weight as {class index: weight}, printed and logged as class_weight.<class> params."""
    from finetune import tracking

    weights = imbalance.class_weights(cfg.trainer.class_weight, classes, counts)
    if weights is not None:
        tracking.log_params({f"class_weight.{classes[c]}": round(w, 6) for c, w in weights.items()})
        shown = ", ".join(f"{classes[c]}={w:.3g}" for c, w in list(weights.items())[:10])
        print(f"   class weights ({cfg.trainer.class_weight}): {shown}" + (", ..." if len(weights) > 10 else ""))
    return weights


@dataclass
class StageReady:
    """A stage frozen, assembled and compiled: what fit (or the range test) runs on."""
    plan: Any
    fitted: Fitted
    bn_layers: list
    backbone_trains: bool


def prepare_stage(run: Run, stage: Stage) -> StageReady:
    """Freeze as the stage says, assemble, choose images or cached features, compile (after the trainable
    changes, for them to take effect; at 1e-3 until optimizer.lr=auto has found the rate)."""
    cfg, parts = run.cfg, run.parts
    plan = apply_freeze(parts.backbone, parts.blocks, stage.policy, stage.n, choice(cfg.freeze.batchnorm))
    backbone_trains = bool(parts.backbone.trainable_weights)
    model = assemble(parts, backbone_training=None if backbone_trains else False)
    bn_layers = trained_batchnorm_layers(model) if cfg.trainer.bn_recalibration else []
    batchnorm.set_momentum(bn_layers, batchnorm.momentum_for(run.images.steps_per_epoch))
    fitted = (on_cached_features(run, stage, model) if uses_feature_cache(cfg, backbone_trains, bn_layers)
              else Fitted(model, run.images, model))
    fitted = compiled(run, fitted, 1e-3 if math.isnan(stage.lr) else stage.lr, head_alone=fitted.model is not model)
    if backbone_trains and run.block_lr:  # per-block rates (finetune.train.layer_lr)
        layer_lr.with_lr_multipliers(fitted.model.optimizer, layer_lr.variable_multipliers(parts.blocks, run.block_lr))
    return StageReady(plan, fitted, bn_layers, backbone_trains)


def compiled(run: Run, fitted: Fitted, lr: float, head_alone: bool) -> Fitted:
    """`fitted.model` compiled at `lr`. A head alone that the previous job kept for the same config comes
    back instead, reset to its start (finetune.train.head_reuse); a new one is kept for the next job."""
    cfg, key = run.cfg, run.head_key if head_alone else None
    kept = head_reuse.kept_model(key, run.parts.head)
    if kept is not None:
        head_reuse.restart(kept, lr)
        print(f"   {head_reuse.REUSED}: the previous job's, reset to its start (only optimizer.lr differs)")
        return dataclasses.replace(fitted, model=kept)
    compile_model(fitted.model, cfg.optimizer, lr, len(run.classes), jit_compile=run.compute.jit_compile,
                  cfg_loss=cfg.loss, one_hot=mixes(cfg.augment), accumulate=int(cfg.trainer.accumulate_steps))
    if key is not None:
        build_optimizer(fitted.model)
        if fitted.model.optimizer.built:  # not under a distribution strategy, where Keras builds it in fit
            head_reuse.keep(key, run.parts.head, fitted.model)
    return fitted


def range_test_only(cfg, spec, dataset, output_dir: Path) -> float:
    """`finetune lr_find`: the setup of a train run, then the range test on its first stage; returns the
    suggested optimizer.lr (the stage's rate / its lr_scale). Nothing trains for real."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with keras_session(cfg, spec) as compute:
        images = image_inputs(cfg, dataset, input_shape_of(cfg.backbone, spec))
        parts = build_parts(cfg.backbone, cfg.head, spec, len(dataset.class_names))
        check_freeze_built(cfg, parts)
        run = Run(cfg, out, dataset, parts, images, compute, Progress(parts))
        run.train_counts = training_counts(dataset, images, needed=str(cfg.trainer.class_weight) == "balanced")
        run.class_weight = record_class_weight(cfg, run.classes, run.train_counts)
        run.block_lr = record_block_lr(cfg, parts.blocks)
        record_setup(cfg, out, dataset, image_setup(run))
        stage = dataclasses.replace(plan_stages(cfg, unfreeze_steps=unfreeze_steps(parts.blocks))[0], lr=float("nan"))
        ready = prepare_stage(run, stage)
        find_learning_rate(cfg, out, run.progress, stage, ready.fitted.model, ready.fitted.inputs, run.class_weight)
    return float(run.progress.lr_found)


def find_learning_rate(cfg, out: Path, progress: Progress, stage: Stage, model, inputs: Inputs,
                       class_weight: dict | None) -> Stage:
    """optimizer.lr=auto: the range test (finetune.train.lr_finder) on the stage's compiled model and
    inputs; the model and optimizer are put back, the rate is recorded (optimizer.lr_found, and the
    checkpoint: a resumed run does not search again). Returns the stage at that rate."""
    from finetune import tracking
    from finetune.train import lr_finder

    steps = int(cfg.trainer.get("lr_find_steps", lr_finder.STEPS))
    print(f"   optimizer.lr=auto: learning-rate range test, {steps} steps from {lr_finder.START_LR:g} to "
          f"{lr_finder.END_LR:g} ...", flush=True)
    result = lr_finder.range_test(model, inputs.train, steps=steps, class_weight=class_weight)
    lr_finder.record(result, out, f"range test: stage '{stage.name}' ({stage.describe()})")
    progress.lr_found = result.suggestion / stage.lr_scale  # the base rate: each stage scales it
    tracking.log_params({"optimizer.lr_found": f"{progress.lr_found:.4g}"})
    print(f"   suggested learning rate {result.suggestion:.3g} ({lr_finder.describe(result)}; "
          f"plot: {out / 'lr_find.png'})")
    return dataclasses.replace(stage, lr=result.suggestion)


def stage_schedule(cfg, stage: Stage, first_epoch: int, batches_per_epoch: int, resume: dict | None):
    """The stage's learning-rate schedule, continuing from the checkpoint's position and state on resume."""
    accumulate = int(cfg.trainer.accumulate_steps)
    plan = schedules.StagePlan(stage.lr, stage.schedule_epochs or stage.epochs, max(1, batches_per_epoch // accumulate))
    state = (resume or {}).get("state", {}).get("schedule")
    # a phase of a gradual stage continues the stage's curve (warmup once, at the stage's start)
    return schedules.ScheduleCallback(cfg.schedule, plan, first_epoch - stage.schedule_offset, batches_per_epoch,
                                      accumulate, state=state)


def record_schedule(out: Path, index: int, stage: Stage, schedule) -> None:
    """The rate of every optimizer update this process ran in the stage: schedule/<stage>.csv."""
    from finetune import tracking

    path = out / "schedule" / f"stage{index + 1}_{stage.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("update,learning_rate\n" + "".join(f"{s},{lr:.8g}\n" for s, lr in schedule.steps))
    tracking.log_artifact(str(path), "schedule")


def on_cached_features(run: Run, stage: Stage, image_model) -> Fitted:
    """The head alone, on the frozen backbone's features of every split (cached across runs)."""
    cfg = run.cfg
    sets = cached_features(cfg, run.parts, run.dataset, run.images, run.compute.keras_policy)
    features, labels = sets["train"]
    views = augmented_views(cfg)
    shape = tuple(features.shape[2:] if views else features.shape[1:])
    print(f"   training the head on cached {run.parts.spec.name} features {shape} of {len(labels)} training images"
          + (f" ({views} augmented views each, one drawn per epoch)" if views else ""))
    inputs = feature_inputs(sets, int(cfg.trainer.batch_size), int(cfg.data.seed), run.images.steps_per_epoch,
                            sampler=choice(cfg.data.get("sampler", "none")), views=augmented_views(cfg))
    return Fitted(head_on_features(run.parts.head, shape), inputs, image_model)


def recalibrate(run: Run, model, bn_layers, step: int) -> None:
    from finetune import tracking
    from finetune.train.stages import expected_end_of_data

    used = batchnorm.recalibrate(model, run.images.train_plain, bn_layers,
                                 int(run.cfg.trainer.bn_recalibration_batches))
    with expected_end_of_data():
        result = model.evaluate(run.images.val, verbose=0, return_dict=True)
    print(f"   BatchNorm statistics of {len(bn_layers)} layer(s) re-estimated over {used} "
          f"training batch(es): val_loss={result['loss']:.4f} val_accuracy={result['accuracy']:.4f}")
    tracking.log_metrics({f"val_{k}_recalibrated": float(v) for k, v in result.items()}, step=step)


def image_setup(run: Run) -> Setup:
    spec = run.parts.spec
    return Setup(backbone=spec.name, weights_source=weights_description(weights_source(run.cfg.backbone)),
                 input_shape=run.parts.input_shape, preprocess=spec.preprocess,
                 params_total=int(assemble(run.parts).count_params()), compute=run.compute)


@contextlib.contextmanager
def keras_session(cfg, spec=None):
    """A fresh Keras graph (sweeps run many jobs in one process), the seed, the precision policy chosen
    for this backbone (a head alone trains in fp32; float32 again afterwards for what runs next) and the
    trainer.strategy scope (finetune.train.distribute)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(cfg.trainer.seed))
    if spec is None:
        compute = ComputeChoice("fp32", False, "a head alone")
    else:
        compute = choose(choice(cfg.trainer.precision), str(cfg.trainer.jit_compile).lower(), spec.family,
                         device_class())
    distribution = distribute.choose(choice(cfg.trainer.get("strategy", "auto")))
    compute = dataclasses.replace(compute, distribution=distribution)
    keras.mixed_precision.set_global_policy(compute.keras_policy)
    try:
        with distribution.scope():  # the model, optimizer, metrics and BatchNorm recalibration: all inside
            yield compute
    finally:
        keras.mixed_precision.set_global_policy("float32")


def train_on_feature_file(cfg, output_dir: Path) -> dict:
    """data=features: the same steps on the vectors of a `finetune extract` folder, one stage, no backbone
    in the loop; the head is then put back on the extraction backbone as one image model."""
    from finetune.train.feature_file import FeatureFile
    from finetune.train.record import record_stage_params

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = FeatureFile.read(cfg.data.path)
    with keras_session(cfg) as compute:
        batch = int(cfg.trainer.batch_size)
        inputs = feature_inputs(source.sets, batch, int(cfg.trainer.seed),
                                int(cfg.trainer.steps_per_epoch or source.steps_per_epoch(batch)),
                                sampler=choice(cfg.data.get("sampler", "none")))
        counts = imbalance.label_counts(source.sets["train"][1], len(source.class_names))
        class_weight = record_class_weight(cfg, list(source.class_names), counts)
        head = build_feature_head(cfg, source)
        model = head_on_features(head, (source.feature_dim,), name="head")
        progress = Progress(None)
        record_setup(cfg, out, source.dataset, source.setup(compute, int(model.count_params())))
        source.record()
        stage = Stage("head_on_features", int(cfg.trainer.epochs), "all", 0, plan_stages(cfg)[0].lr)
        compile_model(model, cfg.optimizer, 1e-3 if math.isnan(stage.lr) else stage.lr, len(source.class_names),
                      cfg_loss=cfg.loss, accumulate=int(cfg.trainer.accumulate_steps))
        if math.isnan(stage.lr):  # optimizer.lr=auto
            stage = find_learning_rate(cfg, out, progress, stage, model, inputs, class_weight)
        schedule = stage_schedule(cfg, stage, 0, inputs.steps_per_epoch, None)
        print(f"\n-- head on cached features ({source.feature_dim} per image): {stage.epochs} epoch(s), "
              f"lr={stage.lr:g}, {schedules.describe(cfg.schedule)}")
        record_stage_params(0, stage, int(model.count_params()))
        progress.begin_stage(stage.name, 0, changes_backbone=False)
        history = fit_stage(model, inputs.train, inputs.val, first_epoch=0, epochs=stage.epochs,
                            callbacks=stage_callbacks(cfg.trainer, 0, 0, schedule=schedule,
                                                      ema=bool(cfg.optimizer.ema)),
                            steps_per_epoch=inputs.steps_per_epoch, class_weight=class_weight,
                            verbose=int(cfg.trainer.verbose))
        record_schedule(out, 0, stage, schedule)
        progress.add(history, 0)
        metrics = evaluate_model(model, inputs, source.class_names, out, f"{source.backbone} on {source.dataset.name}",
                                 train_counts=counts)
        image_model, backbone = source.reassemble(model)
        save_and_record(cfg, out, image_model, backbone, progress)
    return metrics


def build_feature_head(cfg, source):
    from finetune.model.heads import build_head

    return build_head(cfg.head, len(source.class_names))
