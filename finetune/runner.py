"""One training run inside an active MLflow run: build, train stage by stage, evaluate, record."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import keras
import mlflow
import numpy as np
from omegaconf import OmegaConf

from finetune import batchnorm, reports, tracking
from finetune.config import choice
from finetune.data import make_pipeline
from finetune.freeze import apply_freeze, format_plan, plan_json, trained_batchnorm_layers
from finetune.model import assemble, build_parts, weights_source
from finetune.training import MlflowEpochMetrics, compile_model, early_stopping, fit_stage, resolve_stages


class TrainRun:
    def __init__(self, cfg, spec, dataset, output_dir: Path):
        self.cfg, self.spec, self.dataset = cfg, spec, dataset
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = list(dataset.class_names)
        self.history: dict[str, list[float]] = {}
        self.stage_starts: list[tuple[str, int]] = []

    def execute(self) -> dict:
        keras.backend.clear_session()  # a fresh graph per run: sweeps run many jobs in one process
        keras.utils.set_random_seed(int(self.cfg.trainer.seed))
        self.parts = build_parts(self.cfg.backbone, self.cfg.head, self.spec, len(self.classes))
        self.pipelines()
        self.log_setup()
        epoch = 0
        for index, stage in enumerate(resolve_stages(self.cfg)):
            epoch = self.run_stage(index, stage, epoch)
        metrics = self.evaluate()
        self.save_artifacts()
        return metrics

    # -- data -------------------------------------------------------------------------------------
    def pipelines(self) -> None:
        d, t = self.cfg.data, self.cfg.trainer
        size = self.parts.input_shape[:2]
        common = dict(image_size=size, batch_size=int(t.batch_size), seed=int(d.seed),
                      cache=choice(d.cache), cache_max_mb=int(d.cache_max_mb))
        self.train_ds = make_pipeline(self.dataset, "train", training=True,
                                      augment=choice(d.augment), **common)
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
        })
        (self.out / "label_map.json").write_text(json.dumps({
            "class_names": self.classes, "backbone": self.spec.name,
            "input_shape": list(self.input_shape()), "preprocess": self.spec.preprocess,
            "preprocessing_in_model": True, "input_range": [0, 255],
        }, indent=1))
        mlflow.log_artifact(str(self.out / "config.yaml"))
        mlflow.log_artifact(str(self.out / "label_map.json"))
        overrides = self.out / ".hydra" / "overrides.yaml"
        if overrides.exists():
            mlflow.log_artifact(str(overrides))

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
        compile_model(model, self.cfg.optimizer, stage.lr, len(self.classes))  # after trainable changes
        self.stage_starts.append((stage.name, first_epoch))
        print(f"\n-- stage {index + 1} '{stage.name}': {stage.epochs} epoch(s), lr={stage.lr:g}, "
              f"freeze={stage.policy}" + (f" n={stage.n}" if stage.policy == "last_n" else ""))
        callbacks = [MlflowEpochMetrics(index), *early_stopping(self.cfg.trainer.early_stopping)]
        history = fit_stage(model, self.train_ds, self.val_ds, first_epoch=first_epoch,
                            epochs=stage.epochs, callbacks=callbacks,
                            steps_per_epoch=self.cfg.trainer.steps_per_epoch,
                            verbose=int(self.cfg.trainer.verbose))
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)
        last_epoch = first_epoch + len(history.epoch)
        if bn_layers:
            self.recalibrate(model, bn_layers, last_epoch - 1)
        self.model = model
        return last_epoch

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
        mlflow.log_artifact(str(self.out / f"{stem}.txt"), "freeze_plan")
        mlflow.log_artifact(str(self.out / f"{stem}.json"), "freeze_plan")
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        total = int(model.count_params())
        tracking.log_params({f"stage{index + 1}.name": stage.name, f"stage{index + 1}.epochs": stage.epochs,
                             f"stage{index + 1}.freeze": stage.policy, f"stage{index + 1}.n": stage.n,
                             f"stage{index + 1}.lr": stage.lr,
                             f"stage{index + 1}.params_trainable": trainable,
                             f"stage{index + 1}.params_frozen": total - trainable})
        mlflow.set_tag(f"stage{index + 1}", stage.name)

    def recalibrate(self, model, bn_layers, step: int) -> None:
        used = batchnorm.recalibrate(model, self.train_plain_ds, bn_layers,
                                     int(self.cfg.trainer.bn_recalibration_batches))
        result = model.evaluate(self.val_ds, verbose=0, return_dict=True)
        print(f"   BatchNorm statistics of {len(bn_layers)} layer(s) re-estimated over {used} "
              f"training batch(es): val_loss={result['loss']:.4f} val_accuracy={result['accuracy']:.4f}")
        mlflow.log_metrics({f"val_{k}_recalibrated": float(v) for k, v in result.items()}, step=step)

    # -- the end -----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        metrics = {}
        for split, ds in (("val", self.val_ds), ("test", self.test_ds)):
            if ds is None:
                continue
            metrics.update({f"{split}_{k}": float(v) for k, v in
                            self.model.evaluate(ds, verbose=0, return_dict=True).items()})
        split, ds = ("test", self.test_ds) if self.test_ds is not None else ("val", self.val_ds)
        y_true, y_pred = self.predictions(ds)
        per_class = reports.per_class_metrics(y_true, y_pred, self.classes)
        metrics.update({f"{split}_{tracking.metric_key(k)}": v for k, v in per_class.items()})
        matrix = reports.plot_confusion_matrix(y_true, y_pred, self.classes,
                                               self.out / "confusion_matrix.png",
                                               f"{self.spec.name} on {self.dataset.name} ({split})")
        np.savetxt(self.out / "confusion_matrix.csv", matrix, fmt="%d", delimiter=",",
                   header=",".join(self.classes), comments="")
        final = {f"final_{k}" if k.startswith("val_") else k: v for k, v in metrics.items()}
        mlflow.log_metrics(final)
        (self.out / "metrics.json").write_text(json.dumps(final, indent=1))
        return final

    def predictions(self, ds):
        y_true, y_pred = [], []
        for images, labels in ds:
            y_pred.append(np.argmax(self.model.predict_on_batch(images), axis=-1))
            y_true.append(labels.numpy())
        return np.concatenate(y_true), np.concatenate(y_pred)

    def save_artifacts(self) -> None:
        reports.plot_training_curves(self.history, self.stage_starts, self.out / "training_curves.png")
        for name in ("confusion_matrix.png", "confusion_matrix.csv", "training_curves.png", "metrics.json"):
            mlflow.log_artifact(str(self.out / name))
        model_dir = self.out / "model"  # self-contained: what predict/evaluate/export load
        model_dir.mkdir(exist_ok=True)
        self.model.save(model_dir / "model.keras")
        for name in ("label_map.json", "config.yaml"):
            (model_dir / name).write_bytes((self.out / name).read_bytes())
        # the trained backbone alone: reusable as backbone.weights=<file> (weight initialisation)
        self.backbone().save_weights(self.out / "backbone.weights.h5")
        if self.cfg.tracking.log_model:
            mlflow.log_artifacts(str(model_dir), "model")
            mlflow.log_artifact(str(self.out / "backbone.weights.h5"), "backbone")
            if self.cfg.tracking.register_model:
                version = tracking.register_model(self.cfg.tracking.register_model, "model")
                print(f"   registered as models:/{self.cfg.tracking.register_model}/{version}")


    def backbone(self):
        return self.parts.backbone


