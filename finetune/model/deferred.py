"""A model folder whose `model.keras` is assembled when first loaded, not when trained.

A sweep trial that trains a head alone on a frozen backbone's cached features (finetune.train.head_only)
changes nothing but its head, and saving the whole image model (MobileNetV2: ~0.25 s on 2 cores) costs
about as much as training that head. Such a trial writes its model folder as

    head.keras            the trained head over the backbone's features (a few layers; milliseconds)
    backbone.weights.h5   the frozen backbone's weights (a hard link to the run's own copy)
    assembly.json         the Keras dtype policy the run built its backbone in (mixed precision or not)
    label_map.json, config.yaml

and `assemble` builds the same image model the run trained (preprocessing + backbone in inference mode +
head: finetune.model.assemble) and writes `model.keras` beside them, once. Every loader goes through
`finetune.model.load`, which calls it; the sweep assembles its best trial's model when it ends."""
from __future__ import annotations

from pathlib import Path

HEAD_FILE = "head.keras"
BACKBONE_FILE = "backbone.weights.h5"
MODEL_FILE = "model.keras"
ASSEMBLY_FILE = "assembly.json"


def is_deferred(folder: Path) -> bool:
    """A model folder holding the head and the backbone's weights but no model.keras yet."""
    folder = Path(folder)
    return (not (folder / MODEL_FILE).is_file() and (folder / HEAD_FILE).is_file()
            and (folder / BACKBONE_FILE).is_file())


def write(folder: Path, head_model, backbone_weights: Path) -> Path:
    """The deferred form of a head-only run's model in `folder`: its head model (the head's layers over
    the backbone's feature vector), the backbone's weights file (linked) and the Keras dtype policy the
    run built its backbone in (ASSEMBLY_FILE)."""
    import json

    import keras

    from finetune import files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files.save_model(head_model, folder / HEAD_FILE)
    files.link_or_copy(backbone_weights, folder / BACKBONE_FILE)
    files.write_text(folder / ASSEMBLY_FILE, json.dumps({
        "dtype_policy": keras.config.dtype_policy().name, "head": HEAD_FILE, "backbone_weights": BACKBONE_FILE,
        "note": f"{MODEL_FILE} is assembled from these when first loaded (finetune predict/evaluate/export)"},
        indent=1))
    return folder


def assemble(folder: Path, safe_mode: bool = True) -> Path:
    """`folder`/model.keras from its head, backbone weights and config (the run's backbone group, with
    its weights read from the folder's file; or the backbone this process keeps, when the file was saved
    from it: finetune.model.backbone_pool); returns its path. Already there: returned as it is."""
    import keras
    from omegaconf import OmegaConf

    from finetune import files
    from finetune.model import backbone_pool
    from finetune.model.assemble import Parts, assemble as assemble_parts, backbone_from_config, input_shape_of
    from finetune.model.backbones import spec_for
    from finetune.model.preprocessing import preprocessing

    folder = Path(folder)
    target = folder / MODEL_FILE
    if target.is_file():
        return target
    cfg = OmegaConf.load(folder / "config.yaml")
    cfg_backbone = OmegaConf.merge(cfg.backbone, {"weights": str((folder / BACKBONE_FILE).resolve())})
    spec = spec_for(cfg_backbone)
    head = keras.saving.load_model(str(folder / HEAD_FILE), safe_mode=safe_mode, compile=False)  # Keras' layers
    head_layers = [layer for layer in head.layers if not isinstance(layer, keras.layers.InputLayer)]
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_built_in(folder))  # the backbone as the run built it (mixed precision)
    try:
        backbone = backbone_pool.kept_with_weights(folder / BACKBONE_FILE)
        if backbone is None:
            backbone, _ = backbone_from_config(cfg_backbone, spec)
            backbone.trainable = False
        parts = Parts(spec=spec, input_shape=input_shape_of(cfg_backbone, spec), backbone=backbone,
                      preprocess=preprocessing(spec.preprocess, name="preprocess"), head=head_layers, blocks=[])
        model = assemble_parts(parts, backbone_training=False)
    finally:
        keras.config.set_dtype_policy(policy)
    return files.save_model(model, target)


def _built_in(folder: Path) -> str:
    import json

    path = folder / ASSEMBLY_FILE
    return json.loads(path.read_text()).get("dtype_policy", "float32") if path.is_file() else "float32"
