"""`finetune extract`: a backbone (or one of its layers) turns a dataset or images into feature vectors."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from finetune import files
from finetune.progress_bar import progress_bar
from finetune.model.backbones import spec_for
from finetune.model.predict_fn import predict_batch
from finetune.config.schema import choice
from finetune.features.extract import MANIFEST, feature_model, write_features
from finetune.app.checks import check_backbone


def run(cfg, output_dir: Path) -> dict:
    spec = spec_for(cfg.backbone)
    check_backbone(cfg.backbone, spec)
    from finetune.data import load_dataset
    from finetune.data.images import list_images

    images = list_images(cfg.images) if cfg.images else None
    dataset = None if images else load_dataset(cfg.data)
    out = Path(str(cfg.extract.output)).expanduser() if cfg.extract.output else output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        from finetune.errors import ConfigError

        raise ConfigError("extract.output" if cfg.extract.output else "hydra.run.dir", str(out),
                          f"a folder this user can create and write ({error.strerror})") from None
    from finetune import tracking

    with tracking.run(cfg, command="extract", output_dir=output_dir) as run:
        manifest = extract(cfg, spec, dataset, images, out)
        run.log_params({"command": "extract", "backbone": spec.name, "weights": manifest["weights"],
                        "layer": manifest["layer"], "input_shape": manifest["input_shape"],
                        "dataset": manifest["dataset"], "feature_dim": manifest["feature_dim"],
                        "format": manifest["format"], **{f"{k}_size": v for k, v in manifest["counts"].items()}})
        for name in [MANIFEST, manifest["file"], *([manifest["backbone_weights_file"]]
                                                    if manifest.get("backbone_weights_file") else [])]:
            run.log_artifact(out / name, "features")
    run_id = run.run_id
    print("\n== finetune extract: done ==")
    print(f"  vectors      {sum(manifest['counts'].values())} x {manifest['feature_dim']} "
          f"({', '.join(f'{k}={v}' for k, v in manifest['counts'].items())})")
    print(f"  file         {out / manifest['file']}")
    print(f"  manifest     {out / MANIFEST}")
    print(f"  run id       {run_id}")
    print(f"  train on it  finetune train data=features data.path={out}")
    return manifest


def extract(cfg, spec, dataset, images, out: Path) -> dict:
    from finetune.model.assemble import backbone_from_config, weights_source
    from finetune.model.preprocessing import preprocessing

    backbone, shape = backbone_from_config(cfg.backbone, spec)
    weights = weights_source(cfg.backbone)
    model = feature_model(backbone, preprocessing(spec.preprocess, name="preprocess"), shape, cfg.extract.layer)
    batches = list(_batches(cfg, dataset, images, shape[:2]))
    total = sum(len(b[2]) for b in batches)
    features, labels, paths, splits = [], [], [], []
    with progress_bar(total, "extracting features", "images") as bar:
        for split, (x, y), names in batches:
            features.append(predict_batch(model, x))
            labels.append(np.asarray(y))
            paths.extend(names)
            splits.extend([split] * len(names))
            bar.update(len(names))
    vectors = np.concatenate(features).astype(np.float32)
    file = write_features(out / "features", choice(cfg.extract.format), vectors,
                          np.concatenate(labels).astype(np.int32), paths, splits)
    manifest = {
        "backbone": spec.name, "include_top": bool(cfg.backbone.include_top),
        **({"preset": spec.preset} if spec.preset else {}),
        "pooling": choice(cfg.backbone.pooling), "layer": cfg.extract.layer or "<backbone output>",
        "input_shape": list(shape), "preprocess": spec.preprocess, "weights": weights or "random",
        "dataset": "images" if images else dataset.name,
        "class_names": [] if images else list(dataset.class_names),
        "counts": {s: splits.count(s) for s in dict.fromkeys(splits)}, "feature_dim": int(vectors.shape[1]),
        "format": choice(cfg.extract.format), "file": file.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if weights not in (None, "imagenet", "preset"):
        manifest["weights_sha256"] = hashlib.sha256(Path(weights).expanduser().read_bytes()).hexdigest()
    if weights not in ("imagenet", "preset"):  # random or local weights: keep the exact backbone beside its features
        files.save_weights(backbone, out / "backbone.weights.h5")
        manifest["backbone_weights_file"] = "backbone.weights.h5"
    files.write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _batches(cfg, dataset, images, size):
    """(split, (images, labels), names) per batch, in a fixed order."""
    import tensorflow as tf

    from finetune.data import load_image, make_pipeline

    batch_size = int(cfg.extract.batch_size)
    if images:
        for first in range(0, len(images), batch_size):
            names = images[first:first + batch_size]
            yield "images", (tf.stack([load_image(p, size) for p in names]), np.full(len(names), -1)), names
        return
    for split in ("train", "val", "test"):
        part = getattr(dataset, split)
        if part is None or not part.size:
            continue
        pipeline = make_pipeline(dataset, split, size, batch_size, training=False, seed=0, cache="off")
        seen = 0
        for x, y in pipeline:
            n = int(y.shape[0])
            names = (list(part.paths[seen:seen + n]) if part.paths is not None
                     else [f"{split}/{i}" for i in range(seen, seen + n)])
            seen += n
            yield split, (x, y.numpy()), names
