"""Data sources: which one a data config selects, and loading its Dataset (the files, arrays or tfds
specs of each split, with labels and class names).

Pure python for `shapes`, `digits` and `folder` (numpy, PIL, scikit-learn; never tensorflow), so a data
config is checked before TF is imported; `tfds` imports tensorflow_datasets (which itself does not import
tensorflow until data is read). Each source lives in its own module: generated (shapes, digits), folder,
tfds; the split in split.py, the Dataset and the defaults in dataset.py.
"""
from __future__ import annotations

from finetune.data._util import suggest
from finetune.data.dataset import Dataset, Split, cfg_get, data_options
from finetune.data.folder import IMAGE_EXTENSIONS, load_folder, scan_folder
from finetune.data.generated import load_digits_arrays, load_digits_dataset, load_shapes
from finetune.data.split import stratified_split
from finetune.data.tfds import load_tfds, network_reachable
from finetune.errors import ConfigError

# data.source -> the loader of its Dataset (data=features is read by the train command, not here)
LOADERS = {"shapes": load_shapes, "digits": load_digits_dataset, "folder": load_folder, "tfds": load_tfds}
SOURCES = tuple(LOADERS)

__all__ = ["Dataset", "Split", "IMAGE_EXTENSIONS", "LOADERS", "SOURCES", "load_dataset", "source_of",
           "scan_folder", "stratified_split", "network_reachable", "load_digits_arrays"]


def source_of(cfg) -> str:
    """Which source a data config selects.

    `data.source` if set; else `data.name` when it is shapes/digits/folder/tfds; a name like
    'tfds:tf_flowers', or any other name in a config that has tfds fields (train_split), is tfds.
    """
    source = cfg_get(cfg, "source", None)
    name = cfg_get(cfg, "name", None)
    if source:
        if source not in SOURCES:
            raise ConfigError("data.source", source, "one of " + ", ".join(SOURCES), suggest(source, SOURCES))
        return source
    if name in SOURCES:
        return name
    if isinstance(name, str) and (name.startswith("tfds:") or cfg_get(cfg, "train_split", None) is not None):
        return "tfds"
    raise ConfigError("data.name", name, "one of " + ", ".join(SOURCES), suggest(name, SOURCES))


def load_dataset(cfg) -> Dataset:
    """Resolves the data config to a Dataset (file lists / arrays / tfds specs, labels, splits), with the
    schema's defaults for the keys it leaves out.

    Expects a config that passed finetune.app.checks.check_data (the split rule, the tfds split specs, ...:
    the CLI's precheck runs it for every command, train again in-process); raises ConfigError/DataError
    with a one-line message for what only the data shows. Never imports tensorflow for shapes/digits/folder.
    """
    source = source_of(cfg)
    return LOADERS[source](data_options(cfg, source))
