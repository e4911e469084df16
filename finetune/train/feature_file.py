"""data=features: the vectors a `finetune extract` folder holds, as a run's dataset, and the way back to an
image model (the extraction backbone, layer and preprocessing, then the trained head)."""
from __future__ import annotations

from types import SimpleNamespace

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune import tracking
from finetune.errors import DataError
from finetune.train.record import Setup


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


@dataclass
class FeatureFile:
    folder: Path
    manifest: dict
    sets: dict  # {split: (features, labels)}
    dataset: FeatureDataset

    @classmethod
    def read(cls, path) -> "FeatureFile":
        from finetune.features.extract import read_features

        folder = Path(str(path)).expanduser()
        arrays = read_features(folder)
        folder = folder if folder.is_dir() else folder.parent
        manifest, splits = arrays["manifest"], arrays["splits"]
        counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
        if len(manifest.get("class_names", [])) < 2 or not counts["train"] or not counts["val"]:
            raise DataError(f"data.path: received '{folder}'; expected features of a labelled dataset with "
                            f"train and val splits and >= 2 classes (got {counts}, classes "
                            f"{manifest.get('class_names')})")
        sets = {s: (arrays["features"][splits == s], arrays["labels"][splits == s].astype(np.int32))
                for s, n in counts.items() if n}
        dataset = FeatureDataset(f"features:{folder}", list(manifest["class_names"]), _Part(counts["train"]),
                                 _Part(counts["val"]), _Part(counts["test"]) if counts["test"] else None)
        return cls(folder, manifest, sets, dataset)

    @property
    def class_names(self) -> list:
        return self.dataset.class_names

    @property
    def backbone(self) -> str:
        return self.manifest["backbone"]

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, math.ceil(self.dataset.train.size / batch_size))

    def setup(self, compute, params_total: int) -> Setup:
        m = self.manifest
        return Setup(backbone=m["backbone"], weights_source=m["weights"], input_shape=tuple(m["input_shape"]),
                     preprocess=m["preprocess"], params_total=params_total, compute=compute)

    def record(self) -> None:
        tracking.log_params({"feature_file": str(self.folder / self.manifest["file"]),
                             "feature_layer": self.manifest["layer"], "feature_dim": self.feature_dim})

    def reassemble(self, head_model):
        """(image -> the extraction backbone (same weights, layer, preprocessing) -> the trained head,
        that backbone)."""
        import keras

        from finetune.features.extract import feature_model
        from finetune.model.backbones import build_backbone, get_spec, spec_for
        from finetune.model.hub import NAME
        from finetune.model.preprocessing import preprocessing

        m = self.manifest
        weights = m["weights"]
        if m.get("backbone_weights_file"):
            weights = str(self.folder / m["backbone_weights_file"])
        elif weights == "random":
            raise DataError(f"data.path: '{self.folder}' has random-weight features but no backbone.weights.h5")
        shape = tuple(m["input_shape"])
        hub_group = SimpleNamespace(name=NAME, preset=m.get("preset"))
        spec = spec_for(hub_group) if m.get("preset") else get_spec(m["backbone"])
        backbone = build_backbone(spec, weights=weights, input_shape=shape,
                                  include_top=m["include_top"], pooling=m["pooling"])
        layer = None if m["layer"] == "<backbone output>" else m["layer"]
        extractor = feature_model(backbone, preprocessing(m["preprocess"], name="preprocess"), shape, layer)
        model = keras.Model(extractor.input, head_model(extractor.output), name=f"finetune_{m['backbone']}_features")
        print(f"   reassembled {m['backbone']} ({m['layer']}) + head into one image model: "
              f"{model.count_params():,} parameters")
        return model, backbone

