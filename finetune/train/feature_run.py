"""Training a head on features from `finetune extract` (no backbone in the loop), then reassembling
backbone + head into one image model, recorded exactly like a `TrainRun`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune import tracking
from finetune.model.backbones import build_backbone, get_spec
from finetune.errors import DataError
from finetune.features.extract import feature_model, read_features
from finetune.model.heads import build_head
from finetune.model.preprocessing import BackbonePreprocess
from finetune.train.run import TrainRun
from finetune.train.stages import MlflowEpochMetrics, compile_model, early_stopping, fit_stage


@dataclass
class _Part:
    size: int


@dataclass
class FeatureDataset:
    name: str
    class_names: list
    train: _Part
    val: _Part
    test: _Part | None

    def sizes(self) -> dict:
        return {"train": self.train.size, "val": self.val.size, "test": self.test.size if self.test else 0}


class FeatureRun(TrainRun):
    def __init__(self, cfg, output_dir: Path):
        self.folder = Path(str(cfg.data.path)).expanduser()
        self.arrays = read_features(self.folder)
        manifest = self.arrays["manifest"]
        if not self.folder.is_dir():
            self.folder = self.folder.parent
        splits = self.arrays["splits"]
        counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
        if len(manifest.get("class_names", [])) < 2 or not counts["train"] or not counts["val"]:
            raise DataError(f"data.path: received '{self.folder}'; expected features of a labelled dataset with "
                            f"train and val splits and >= 2 classes (got {counts}, classes "
                            f"{manifest.get('class_names')})")
        dataset = FeatureDataset(f"features:{self.folder}", list(manifest["class_names"]),
                                 _Part(counts["train"]), _Part(counts["val"]),
                                 _Part(counts["test"]) if counts["test"] else None)
        self.manifest = manifest
        super().__init__(cfg, get_spec(manifest["backbone"]), dataset, output_dir)

    def execute(self) -> dict:
        keras.backend.clear_session()
        keras.utils.set_random_seed(int(self.cfg.trainer.seed))
        self.head = build_head(self.cfg.head, len(self.classes))
        inputs = keras.Input(shape=(self.manifest["feature_dim"],), name="features")
        x = inputs
        for layer in self.head:
            x = layer(x)
        self.model = keras.Model(inputs, x, name="head")
        self.pipelines()
        self.log_setup()
        tracking.log_params({"feature_file": str(self.folder / self.manifest["file"]),
                             "feature_layer": self.manifest["layer"], "feature_dim": self.manifest["feature_dim"]})
        self.fit_head()
        metrics = self.evaluate()
        self.head_model = self.model
        self.model = self.reassemble()
        self.save_artifacts()
        return metrics

    def pipelines(self) -> None:
        batch = int(self.cfg.trainer.batch_size)

        def split(name, training=False):
            mask = self.arrays["splits"] == name
            ds = tf.data.Dataset.from_tensor_slices((self.arrays["features"][mask],
                                                     self.arrays["labels"][mask].astype(np.int32)))
            if training:
                ds = ds.shuffle(int(mask.sum()), seed=int(self.cfg.trainer.seed), reshuffle_each_iteration=True)
            return ds.batch(batch).prefetch(tf.data.AUTOTUNE)

        self.train_ds, self.val_ds = split("train", training=True), split("val")
        self.test_ds = split("test") if self.dataset.test else None
        self.steps_per_epoch = max(1, math.ceil(self.dataset.train.size / batch))

    def fit_head(self) -> None:
        lr = float(self.cfg.optimizer.lr)
        compile_model(self.model, self.cfg.optimizer, lr, len(self.classes))
        print(f"\n-- head on cached features ({self.manifest['feature_dim']} per image): "
              f"{self.cfg.trainer.epochs} epoch(s), lr={lr:g}")
        tracking.log_params({"stage1.name": "head_on_features", "stage1.epochs": self.cfg.trainer.epochs,
                             "stage1.lr": lr, "stage1.params_trainable": self.model.count_params()})
        self.stage_starts.append(("head_on_features", 0))
        history = fit_stage(self.model, self.train_ds, self.val_ds, first_epoch=0,
                            epochs=int(self.cfg.trainer.epochs),
                            callbacks=[MlflowEpochMetrics(0), *early_stopping(self.cfg.trainer.early_stopping)],
                            steps_per_epoch=self.cfg.trainer.steps_per_epoch, verbose=int(self.cfg.trainer.verbose))
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(float(v) for v in values)

    def reassemble(self):
        """image -> the extraction backbone (same weights, layer, preprocessing) -> the trained head."""
        m = self.manifest
        weights = m["weights"]
        if m.get("backbone_weights_file"):
            weights = str(self.folder / m["backbone_weights_file"])
        elif weights == "random":
            raise DataError(f"data.path: '{self.folder}' has random-weight features but no backbone.weights.h5")
        shape = tuple(m["input_shape"])
        self._backbone = build_backbone(self.spec, weights=weights, input_shape=shape,
                                        include_top=m["include_top"], pooling=m["pooling"])
        layer = None if m["layer"] == "<backbone output>" else m["layer"]
        extractor = feature_model(self._backbone, BackbonePreprocess(m["preprocess"], name="preprocess"),
                                  shape, layer)
        outputs = self.head_model(extractor.output)
        model = keras.Model(extractor.input, outputs, name=f"finetune_{self.spec.name}_features")
        print(f"   reassembled {self.spec.name} ({m['layer']}) + head into one image model: "
              f"{model.count_params():,} parameters")
        return model

    def input_shape(self) -> tuple:
        return tuple(self.manifest["input_shape"])

    def weights_description(self) -> str:
        return self.manifest["weights"]

    def parts_param_count(self) -> int:
        return int(self.model.count_params())

    def backbone(self):
        return self._backbone
