"""`finetune classify`: the pretrained model with its ImageNet classifier labels images (top-k)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from finetune.model.backbones import spec_for
from finetune.model.predict_fn import predict_batch
from finetune.progress_bar import progress_bar
from finetune.errors import ConfigError
from finetune.data.images import list_images
from finetune.app.checks import check_classify

CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"  # the hash Keras checks


def run(cfg, output_dir: Path) -> dict:
    spec = spec_for(cfg.backbone)
    check_classify(cfg, spec)
    images = list_images(cfg.images)
    class_index = load_class_index(cfg.classify.class_index)
    from finetune import tracking

    with tracking.run(cfg, command="classify", output_dir=output_dir) as run:
        rows = classify_images(cfg, spec, images, class_index)
        files = write_outputs(rows, output_dir, cfg.classify.output)
        run.log_params({"command": "classify", "backbone": spec.name, "weights": str(cfg.backbone.weights),
                        "top_k": cfg.classify.top_k, "num_images": len(images)})
        for path in files:
            run.log_artifact(path, "classify")
    run_id = run.run_id
    print_table(rows, int(cfg.classify.top_k))
    print(f"\n{len(images)} image(s) classified; table: {', '.join(str(f) for f in files)}; MLflow run {run_id}")
    return {"images": len(images)}


def load_class_index(path) -> dict[int, tuple[str, str]]:
    """{class number: (wordnet id, name)} from a local file, or the file Keras downloads and caches."""
    if path:
        source = Path(str(path)).expanduser()
        if not source.is_file():
            raise ConfigError("classify.class_index", path, "an existing imagenet_class_index.json file")
    else:
        source = _download_class_index()
    try:
        raw = json.loads(source.read_text())
        index = {int(k): (str(v[0]), str(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise ConfigError("classify.class_index", str(source),
                          'a JSON object {"0": ["n01440764", "tench"], ...}') from error
    return index


def _download_class_index() -> Path:
    import keras

    try:
        return Path(keras.utils.get_file("imagenet_class_index.json", CLASS_INDEX_URL,
                                         cache_subdir="models", file_hash=CLASS_INDEX_MD5))
    except Exception as error:  # noqa: BLE001 - any failure here means: no class index on this machine
        raise ConfigError(
            "classify.class_index", None,
            f"a local imagenet_class_index.json (the download failed: {str(error).splitlines()[0][:120]})",
            f"Offline: fetch {CLASS_INDEX_URL} on a connected machine and pass classify.class_index=<path>, "
            "or copy it to ~/.keras/models/") from error


def classify_images(cfg, spec, images: list[str], class_index) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    model = build_classifier(cfg, spec)
    classes = int(model.output_shape[-1])
    if len(class_index) != classes:
        raise ConfigError("classify.class_index", cfg.classify.class_index or "keras' imagenet_class_index.json",
                          f"{classes} classes, as many as the model outputs (it has {len(class_index)})")
    from finetune.data import load_image

    size = tuple(model.input_shape[1:3])
    top_k = min(int(cfg.classify.top_k), classes)
    batch_size = int(cfg.classify.batch_size)
    rows = []
    with progress_bar(len(images), "classifying", "images") as bar:
        for first in range(0, len(images), batch_size):
            paths = images[first:first + batch_size]
            batch = tf.stack([load_image(p, size) for p in paths])
            probs = predict_batch(model, batch)
            for path, p in zip(paths, probs):
                for rank, k in enumerate(np.argsort(-p, kind="stable")[:top_k], start=1):
                    wnid, name = class_index[int(k)]
                    rows.append({"image": path, "rank": rank, "class": int(k), "wnid": wnid, "name": name,
                                 "probability": float(p[k])})
            bar.update(len(paths))
    return rows


def build_classifier(cfg, spec):
    import keras

    from finetune.model.assemble import backbone_from_config
    from finetune.model.preprocessing import preprocessing

    backbone, shape = backbone_from_config(cfg.backbone, spec)  # include_top checked above
    inputs = keras.Input(shape=shape, name="image")
    outputs = backbone(preprocessing(spec.preprocess, name="preprocess")(inputs), training=False)
    return keras.Model(inputs, outputs, name=f"classify_{spec.name}")


def write_outputs(rows: list[dict], output_dir: Path, requested) -> list[Path]:
    files = [output_dir / "classify.csv"]
    if requested:
        files.append(Path(str(requested)).expanduser())
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(rows, indent=1))
        else:
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return files


def print_table(rows: list[dict], top_k: int) -> None:
    current = None
    for row in rows:
        if row["image"] != current:
            current = row["image"]
            print(f"\n{current}")
        print(f"  {row['rank']:>2}. {row['name']:<30} {row['wnid']:<10} {row['probability']:.4f}")
