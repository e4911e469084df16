"""One training run inside an active MLflow run: build, train stage by stage, evaluate, record."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
from omegaconf import OmegaConf

from finetune import files, tracking

from finetune.model import batchnorm

from finetune.train import reports
from finetune.train.checkpoint import (Checkpoints, assign_weights, config_hash, optimizer_arrays, restore_optimizer,
                                 weight_arrays)
from finetune.train.compute import ComputeChoice, choose, device_class
from finetune.config.schema import choice
from finetune.data import make_pipeline
from finetune.model.freeze import apply_freeze, format_plan, plan_json, trained_batchnorm_layers
from finetune.model.assemble import assemble, build_parts, weights_source
from finetune.train.stages import MlflowEpochMetrics, compile_model, early_stopping, fit_stage, resolve_stages


class TrainRun:
    def __init__(self, cfg, spec, dataset, output_dir: Path, resume: dict | None = None):
        self.cfg, self.spec, self.dataset = cfg, spec, dataset
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = list(dataset.class_names)
        self.history: dict[str, list[float]] = {}
        self.stage_starts: list[tuple[str, int]] = []
        self.feature_sets = None  # {"train"/"val"/"test": (features, labels)} while a stage uses them
        self.compute = ComputeChoice("fp32", False, "a head alone")  # execute() chooses for a backbone
        self.resume = resume  # a loaded checkpoint (finetune.train.checkpoint) to continue from, or None
        self.checkpoints = Checkpoints(self.out) if cfg.trainer.get("checkpoint", False) else None
        self.backbone_changed = False  # once True, checkpoints hold the backbone's weights too
        self.config_key = config_hash(cfg) if self.checkpoints is not None else None

    def execute(self) -> dict:
        keras.backend.clear_session()  # a fresh graph per run: sweeps run many jobs in one process
        keras.utils.set_random_seed(int(self.cfg.trainer.seed))
        self.compute = choose(choice(self.cfg.trainer.precision), str(self.cfg.trainer.jit_compile).lower(),
                              self.spec.family, device_class())
        keras.mixed_precision.set_global_policy(self.compute.keras_policy)
        try:
            self.parts = build_parts(self.cfg.backbone, self.cfg.head, self.spec, len(self.classes))
            self.pipelines()
            self.log_setup()
            epoch, done = self.restore_progress() if self.resume else (0, 0)
            for index, stage in enumerate(resolve_stages(self.cfg)):
                if index < done:  # finished before the interruption
                    continue
                epoch = self.run_stage(index, stage, epoch)
                self.save_checkpoint(index + 1, epoch, epoch, {}, None)  # the next stage starts afresh
            if not hasattr(self, "model"):  # interrupted after the last stage: only the end is left
                self.model = assemble(self.parts)
                compile_model(self.model, self.cfg.optimizer, float(self.cfg.optimizer.lr), len(self.classes))
            metrics = self.evaluate()
            self.save_artifacts()
            if self.checkpoints is not None:  # the saved model supersedes it
                shutil.rmtree(self.checkpoints.folder, ignore_errors=True)
        finally:  # later models in this process (a sweep's next job, predict) start from the default
            keras.mixed_precision.set_global_policy("float32")
        return metrics

    # -- data -------------------------------------------------------------------------------------
    def pipelines(self) -> None:
        d, t = self.cfg.data, self.cfg.trainer
        size = self.parts.input_shape[:2]
        common = dict(image_size=size, batch_size=int(t.batch_size), seed=int(d.seed),
                      cache=choice(d.cache), cache_max_mb=int(d.cache_max_mb))
        # one iterator for the whole stage (repeat + steps_per_epoch): a new iterator every epoch
        # stalls each epoch's end until tf.data's autotuner wakes up (measured: up to 2x on short epochs)
        self.train_ds = make_pipeline(self.dataset, "train", training=True,
                                      augment=choice(d.augment), **common).repeat()
        # the training images in order, without augmentation: for BatchNorm re-estimation
        self.train_plain_ds = make_pipeline(self.dataset, "train", training=False, **common)
        self.val_ds = make_pipeline(self.dataset, "val", training=False, **common)
        self.test_ds = (make_pipeline(self.dataset, "test", training=False, **common)
                        if self.dataset.test is not None and self.dataset.test.size else None)
        self.steps_per_epoch = t.steps_per_epoch or max(1, math.ceil(
            self.dataset.train.size / int(t.batch_size)))

    # -- what the run records before training ------------------------------------------------------
    def log_setup(self) -> None:
        resolved = OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        sizes = self.dataset.sizes()
        tracking.log_params(tracking.flatten(resolved))
        tracking.log_params({
            "backbone": self.spec.name,
            "weights_source": self.weights_description(),
            "input_shape": list(self.input_shape()),
            "preprocess": self.spec.preprocess,
            "dataset": self.dataset.name,
            **{f"{split}_size": n for split, n in sizes.items()},
            "num_classes": len(self.classes),
            "class_names": ",".join(self.classes),
            "params_total": self.parts_param_count(),
            "compute.precision": self.compute.precision, "compute.jit_compile": self.compute.jit_compile,
        })
        tracking.set_tag("compute.reason", self.compute.reason)
        print(f"   compute: {self.compute.precision}, jit_compile={self.compute.jit_compile} ({self.compute.reason})")
        (self.out / "label_map.json").write_text(json.dumps({
            "class_names": self.classes, "backbone": self.spec.name,
            "input_shape": list(self.input_shape()), "preprocess": self.spec.preprocess,
            "preprocessing_in_model": True, "input_range": [0, 255],
        }, indent=1))
        tracking.log_artifact(str(self.out / "config.yaml"))
        tracking.log_artifact(str(self.out / "label_map.json"))
        overrides = self.out / ".hydra" / "overrides.yaml"
        if overrides.exists():
            tracking.log_artifact(str(overrides))
        if getattr(self.dataset, "skipped", None):  # files the pre-flight scan left out (data.on_bad_file)
            (self.out / "skipped_files.json").write_text(json.dumps(self.dataset.skipped, indent=1))
            tracking.log_artifact(str(self.out / "skipped_files.json"))
            tracking.log_params({"skipped_files": len(self.dataset.skipped)})

    def input_shape(self) -> tuple:
        return self.parts.input_shape

    def weights_description(self) -> str:
        weights = weights_source(self.cfg.backbone)
        if weights is None:
            return "random"
        if weights == "imagenet":
            return "imagenet"
        digest = hashlib.sha256(Path(weights).expanduser().read_bytes()).hexdigest()[:16]
        return f"file:{Path(weights).expanduser().resolve()} sha256:{digest}"

    def parts_param_count(self) -> int:
        model = assemble(self.parts)
        return int(model.count_params())

    # -- training ----------------------------------------------------------------------------------
    def run_stage(self, index: int, stage, first_epoch: int) -> int:
        plan = apply_freeze(self.parts.backbone, self.parts.blocks, stage.policy, stage.n,
                            choice(self.cfg.freeze.batchnorm))
        backbone_trains = bool(self.parts.backbone.trainable_weights)
        model = assemble(self.parts, backbone_training=None if backbone_trains else False)
        self.record_plan(index, stage, plan, model)
        bn_layers = trained_batchnorm_layers(model) if self.cfg.trainer.bn_recalibration else []
        batchnorm.set_momentum(bn_layers, batchnorm.momentum_for(self.steps_per_epoch))
        compile_model(model, self.cfg.optimizer, stage.lr, len(self.classes),  # after trainable changes
                      jit_compile=self.compute.jit_compile)
        self.stage_starts.append((stage.name, first_epoch))
        self.backbone_changed = self.backbone_changed or backbone_trains or bool(bn_layers)
        resume, self.resume = self.resume, None  # a checkpoint taken inside this stage, if any
        start = resume["state"]["epoch"] if resume else first_epoch
        print(f"\n-- stage {index + 1} '{stage.name}': {stage.epochs} epoch(s), lr={stage.lr:g}, "
              f"freeze={stage.policy}" + (f" n={stage.n}" if stage.policy == "last_n" else "")
              + (f"; continuing at epoch {start + 1}" if start > first_epoch else ""))
        checkpoint = EpochCheckpoint(self, index, first_epoch)
        callbacks = [checkpoint, MlflowEpochMetrics(index), *early_stopping(self.cfg.trainer.early_stopping)]
        self.feature_sets = None
        if self.uses_feature_cache(backbone_trains, bn_layers):
            history = self.fit_head_on_features(index, stage, first_epoch, callbacks, resume)
        else:
            self.restore(model, resume)
            history = fit_stage(model, self.skip_epochs(self.train_ds, start - first_epoch), self.val_ds,
                                first_epoch=start, epochs=stage.epochs - (start - first_epoch),
                                callbacks=callbacks, steps_per_epoch=self.steps_per_epoch,
                                verbose=int(self.cfg.trainer.verbose))
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)
        last_epoch = start + len(history.epoch)
        if bn_layers:
            self.recalibrate(model, bn_layers, last_epoch - 1)
        self.model = model
        return last_epoch

    # -- checkpoints and resuming (finetune.train.checkpoint) --------------------------------------------------
    def save_checkpoint(self, stage: int, epoch: int, stage_first_epoch: int, current: dict, optimizer) -> None:
        """`current`: this stage's epoch logs not yet in self.history; optimizer: mid-stage state or None."""
        if self.checkpoints is None:
            return
        history = {k: list(v) for k, v in self.history.items()}
        for key, values in current.items():
            history.setdefault(key, []).extend(values)
        state = {"stage": stage, "epoch": epoch, "stage_first_epoch": stage_first_epoch, "history": history,
                 "stage_starts": [list(s) for s in self.stage_starts], "backbone_changed": self.backbone_changed,
                 "run_id": mlflow.active_run().info.run_id if mlflow.active_run() else None,
                 "config_hash": self.config_key}
        weights = weight_arrays(self.parts.backbone, self.parts.head, self.backbone_changed)
        self.checkpoints.save(state, weights, optimizer_arrays(optimizer) if optimizer is not None else None)

    def restore_progress(self) -> tuple[int, int]:
        """From self.resume: history, stage starts and weights back; MLflow gets any epoch it missed.
        Returns (first epoch of the stage to run, index of that stage)."""
        state = self.resume["state"]
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.stage_starts = [(name, int(first)) for name, first in state["stage_starts"]][:state["stage"]]
        self.backbone_changed = bool(state["backbone_changed"])
        assign_weights(self.resume["weights"], self.parts.backbone, self.parts.head)
        if self.resume["optimizer"] is None:  # taken between stages: the next stage starts afresh
            self.resume = None
        self.log_missing_epochs(int(state["epoch"]))
        print(f"   resuming: {state['epoch']} epoch(s) done (stage {state['stage'] + 1}), checkpoint of "
              f"{state.get('saved', '?')} in {self.checkpoints.folder if self.checkpoints else self.out}")
        tracking.set_tag("resumed_from_epoch", str(state["epoch"]))
        return int(state["stage_first_epoch"]), int(state["stage"])

    def log_missing_epochs(self, epochs: int) -> None:
        """Epochs the checkpoint holds but MLflow lacks (killed between the two): logged once, same step."""
        run = mlflow.active_run()
        try:
            history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
        except Exception as error:  # noqa: BLE001 - tracking server away: nothing is re-logged
            print(f"   could not read the run's logged epochs ({type(error).__name__}); none re-logged")
            return
        logged = {m.step for m in history}
        starts = [first for _, first in self.stage_starts]
        for step in range(epochs):
            if step in logged:
                continue
            values = {k: v[step] for k, v in self.history.items() if len(v) > step}
            values["stage"] = float(sum(1 for first in starts if first <= step) - 1)
            tracking.log_metrics(values, step=step)

    def restore(self, training_model, resume: dict | None) -> None:
        if resume is None:
            return
        assign_weights(resume["weights"], self.parts.backbone, self.parts.head)
        if resume["optimizer"] is not None:
            restore_optimizer(training_model, resume["optimizer"])

    def skip_epochs(self, ds, epochs: int):
        """The repeated training pipeline from epoch `epochs` of the stage on: an interrupted run sees
        the same (seeded) data order as one that was never interrupted."""
        return ds.skip(epochs * self.steps_per_epoch) if epochs > 0 else ds

    # -- a frozen backbone's features, computed once ------------------------------------------------
    def uses_feature_cache(self, backbone_trains: bool, bn_layers) -> bool:
        """Only where training on cached features is exactly training on images: nothing in the backbone
        trains, it runs in inference mode, and no augmentation changes the inputs between epochs."""
        return (choice(self.cfg.trainer.feature_cache) != "off" and not backbone_trains and not bn_layers
                and choice(self.cfg.data.augment) == "none")

    def fit_head_on_features(self, index: int, stage, first_epoch: int, callbacks, resume=None):
        import tensorflow as tf

        self.feature_sets = self.cached_features()
        features, labels = self.feature_sets["train"]
        inputs = keras.Input(shape=features.shape[1:], name="features")
        x = inputs
        for layer in self.parts.head:  # the same layer objects: the assembled model gets the weights
            x = layer(x)
        self.head_model = keras.Model(inputs, x, name="head_on_features")
        compile_model(self.head_model, self.cfg.optimizer, stage.lr, len(self.classes),
                      jit_compile=self.compute.jit_compile)
        batch, seed = int(self.cfg.trainer.batch_size), int(self.cfg.data.seed)
        train = (tf.data.Dataset.from_tensor_slices((features, labels))
                 .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
                 .batch(batch).repeat().prefetch(tf.data.AUTOTUNE))
        print(f"   training the head on cached {self.spec.name} features {tuple(features.shape[1:])} "
              f"of {len(labels)} training images")
        self.restore(self.head_model, resume)
        start = resume["state"]["epoch"] if resume else first_epoch
        return fit_stage(self.head_model, self.skip_epochs(train, start - first_epoch), self.feature_dataset("val"),
                         first_epoch=start, epochs=stage.epochs - (start - first_epoch), callbacks=callbacks,
                         steps_per_epoch=self.steps_per_epoch, verbose=int(self.cfg.trainer.verbose))

    def feature_dataset(self, split: str):
        import tensorflow as tf

        if not self.feature_sets or split not in self.feature_sets:
            return None
        features, labels = self.feature_sets[split]
        return tf.data.Dataset.from_tensor_slices((features, labels)).batch(int(self.cfg.trainer.batch_size))

    def cached_features(self) -> dict:
        """(features, labels) of every split, from the feature cache or extracted (then stored)."""
        import time

        from finetune.features.cache import FeatureCache, cache_key, split_fingerprint, weights_digest

        cache = FeatureCache(max_gb=float(self.cfg.trainer.feature_cache_max_gb))
        refresh = choice(self.cfg.trainer.feature_cache) == "refresh"
        backbone = {"name": self.spec.name, "include_top": bool(self.cfg.backbone.include_top),
                    "pooling": choice(self.cfg.backbone.pooling), "input_shape": list(self.input_shape()),
                    "preprocess": self.spec.preprocess, "weights": weights_digest(self.parts.backbone),
                    "layer": None, "keras": keras.__version__, "precision": self.compute.keras_policy}
        extractor = None
        sets, status = {}, {}
        pipelines = {"train": self.train_plain_ds, "val": self.val_ds, "test": self.test_ds}
        for split, ds in pipelines.items():
            if ds is None:
                continue
            description = {"backbone": backbone, "data": split_fingerprint(self.dataset, split)}
            key = cache_key(description)
            found = None if refresh else cache.load(key)
            if found is None:
                extractor = extractor or self.feature_extractor()
                start = time.perf_counter()
                found = self.extract(extractor, ds)
                seconds = time.perf_counter() - start
                cache.store(key, found["features"], found["labels"], description)
                print(f"   feature cache miss ({split}): extracted {len(found['labels'])} images in {seconds:.1f} s "
                      f"({len(found['labels']) / max(seconds, 1e-9):.0f} images/s); key {key}")
                status[split] = "refresh" if refresh else "miss"
            else:
                print(f"   feature cache hit ({split}): {len(found['labels'])} images; key {key}")
                status[split] = "hit"
            sets[split] = (found["features"], found["labels"])
            tracking.log_params({f"feature_cache.{split}.key": key})
            tracking.set_tag(f"feature_cache.{split}", status[split])
        tracking.set_tag("feature_cache", ",".join(sorted(set(status.values()))))
        tracking.set_tag("feature_cache_dir", str(cache.root))
        return sets

    def feature_extractor(self):
        from finetune.features.extract import feature_model

        # the backbone's own output shape: the head was built for it (a Flatten head flattens itself)
        return feature_model(self.parts.backbone, self.parts.preprocess, self.input_shape(), None, flatten=False)

    @staticmethod
    def extract(extractor, ds) -> dict:
        features, labels = [], []
        for images, batch_labels in ds:
            features.append(np.asarray(extractor.predict_on_batch(images), np.float32))
            labels.append(batch_labels.numpy())
        return {"features": np.concatenate(features), "labels": np.concatenate(labels).astype(np.int32)}

    def record_plan(self, index: int, stage, plan, model) -> None:
        title = (f"freeze plan, stage {index + 1} '{stage.name}' ({self.spec.name}, freeze={stage.policy}"
                 + (f", n={stage.n}" if stage.policy == "last_n" else "")
                 + f", batchnorm={choice(self.cfg.freeze.batchnorm)})")
        text = format_plan(plan, title)
        head = sum(int(np.prod(w.shape)) for layer in self.parts.head for w in layer.trainable_weights)
        text += f"\n  head: {head:,} trainable parameters"
        print(text)
        stem = f"freeze_plan_{index + 1}_{stage.name}"
        (self.out / f"{stem}.txt").write_text(text + "\n")
        (self.out / f"{stem}.json").write_text(plan_json(plan))
        tracking.log_artifact(str(self.out / f"{stem}.txt"), "freeze_plan")
        tracking.log_artifact(str(self.out / f"{stem}.json"), "freeze_plan")
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        total = int(model.count_params())
        tracking.log_params({f"stage{index + 1}.name": stage.name, f"stage{index + 1}.epochs": stage.epochs,
                             f"stage{index + 1}.freeze": stage.policy, f"stage{index + 1}.n": stage.n,
                             f"stage{index + 1}.lr": stage.lr,
                             f"stage{index + 1}.params_trainable": trainable,
                             f"stage{index + 1}.params_frozen": total - trainable})
        tracking.set_tag(f"stage{index + 1}", stage.name)

    def recalibrate(self, model, bn_layers, step: int) -> None:
        used = batchnorm.recalibrate(model, self.train_plain_ds, bn_layers,
                                     int(self.cfg.trainer.bn_recalibration_batches))
        result = model.evaluate(self.val_ds, verbose=0, return_dict=True)
        print(f"   BatchNorm statistics of {len(bn_layers)} layer(s) re-estimated over {used} "
              f"training batch(es): val_loss={result['loss']:.4f} val_accuracy={result['accuracy']:.4f}")
        tracking.log_metrics({f"val_{k}_recalibrated": float(v) for k, v in result.items()}, step=step)

    # -- the end -----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Metrics of the final model. After a stage on cached features, the head on those features is
        the whole model's computation (the backbone ran in inference mode), so no image is run again."""
        if self.feature_sets:
            model, sets = self.head_model, {s: self.feature_dataset(s) for s in ("val", "test")}
        else:
            model, sets = self.model, {"val": self.val_ds, "test": self.test_ds}
        metrics = {}
        for split, ds in sets.items():
            if ds is None:
                continue
            metrics.update({f"{split}_{k}": float(v) for k, v in
                            model.evaluate(ds, verbose=0, return_dict=True).items()})
        split = "test" if sets["test"] is not None else "val"
        y_true, y_pred = self.predictions(model, sets[split])
        per_class = reports.per_class_metrics(y_true, y_pred, self.classes)
        metrics.update({f"{split}_{tracking.metric_key(k)}": v for k, v in per_class.items()})
        matrix = reports.plot_confusion_matrix(y_true, y_pred, self.classes,
                                               self.out / "confusion_matrix.png",
                                               f"{self.spec.name} on {self.dataset.name} ({split})")
        np.savetxt(self.out / "confusion_matrix.csv", matrix, fmt="%d", delimiter=",",
                   header=",".join(self.classes), comments="")
        final = {f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()}
        tracking.log_metrics(final)
        (self.out / "metrics.json").write_text(json.dumps(final, indent=1))
        return final

    @staticmethod
    def predictions(model, ds):
        y_true, y_pred = [], []
        for inputs, labels in ds:
            y_pred.append(np.argmax(model.predict_on_batch(inputs), axis=-1))
            y_true.append(labels.numpy())
        return np.concatenate(y_true), np.concatenate(y_pred)

    def save_artifacts(self) -> None:
        reports.plot_training_curves(self.history, self.stage_starts, self.out / "training_curves.png")
        for name in ("confusion_matrix.png", "confusion_matrix.csv", "training_curves.png", "metrics.json"):
            tracking.log_artifact(str(self.out / name))
        model_dir = self.out / "model"  # self-contained: what predict/evaluate/export load
        model_dir.mkdir(exist_ok=True)
        files.save_model(self.model, model_dir / "model.keras")
        for name in ("label_map.json", "config.yaml"):
            (model_dir / name).write_bytes((self.out / name).read_bytes())
        # the trained backbone alone: reusable as backbone.weights=<file> (weight initialisation)
        files.save_weights(self.backbone(), self.out / "backbone.weights.h5")
        if self.cfg.tracking.log_model:
            tracking.log_artifact(str(model_dir), "model")
            tracking.log_artifact(str(self.out / "backbone.weights.h5"), "backbone")
            if self.cfg.tracking.register_model:
                version = tracking.register_model(self.cfg.tracking.register_model, "model")
                print(f"   registered as models:/{self.cfg.tracking.register_model}/{version}" if version
                      else "   model registration kept for later (tracking server unreachable)")


    def backbone(self):
        return self.parts.backbone


class EpochCheckpoint(keras.callbacks.Callback):
    """At each epoch end, before the epoch's metrics go to MLflow: the run's checkpoint (weights,
    optimizer, history), so a kill at any later point loses nothing of this epoch."""

    def __init__(self, run: TrainRun, stage_index: int, stage_first_epoch: int):
        super().__init__()
        self.run, self.stage_index, self.stage_first_epoch = run, stage_index, stage_first_epoch
        self.logs: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.logs.setdefault(key, []).append(float(value))
        self.run.save_checkpoint(self.stage_index, epoch + 1, self.stage_first_epoch, self.logs,
                                 self.model.optimizer)
