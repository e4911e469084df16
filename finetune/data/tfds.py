"""`data=tfds`: any tensorflow-datasets dataset, prepared (downloaded) on first use.

Imports tensorflow_datasets only when a dataset is loaded (it does not import tensorflow until data is
read). The split specs were checked before (finetune.app.checks.check_data); what is checked here needs
the dataset in hand: its name in the catalog, its splits and its features.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from finetune.data._util import suggest
from finetune.data.dataset import Dataset, Split, cfg_get
from finetune.errors import ConfigError, DataError

# Hosts that tfds downloads from (GCS mirror first, then the original hosts of popular sets).
TFDS_HOSTS = (("storage.googleapis.com", 443), ("download.tensorflow.org", 443))


def _proxy_target():
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        url = os.environ.get(var)
        if url:
            from urllib.parse import urlsplit

            parts = urlsplit(url if "://" in url else "http://" + url)
            if parts.hostname:
                return parts.hostname, parts.port or 8080
    return None


def network_reachable(hosts=TFDS_HOSTS, timeout: float = 3.0) -> bool:
    """True if a TCP connection to any of `hosts` (or the https proxy) succeeds within ~timeout s.

    DNS lookups run in daemon threads too, so a hanging resolver cannot stall the caller.
    """
    proxy = _proxy_target()
    targets = [proxy] if proxy else list(hosts)
    ok = threading.Event()

    def probe(host, port):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass

    threads = [threading.Thread(target=probe, args=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout + 0.5
    while time.monotonic() < end and not ok.is_set() and any(t.is_alive() for t in threads):
        ok.wait(0.05)
    return ok.is_set()


def dataset_name(cfg) -> tuple[str, str]:
    """(tensorflow-datasets name, the config key it came from): data.name (also as 'tfds:<name>'), or
    `dataset`/`tfds_name` in a config built without Hydra."""
    for key in ("dataset", "tfds_name"):
        value = cfg_get(cfg, key, None)
        if value:
            return str(value), f"data.{key}"
    name = str(cfg_get(cfg, "name", None) or "")
    if name.startswith("tfds:"):
        name = name[5:]
    if name and name != "tfds":
        return name, "data.name"
    raise ConfigError("data.name", name or None, "a tensorflow-datasets name (e.g. tf_flowers)",
                      "set data.name=tf_flowers")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _builder(dataset: str, name_key: str, data_dir):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        try:
            known = tfds.list_builders(with_community_datasets=False)
        except Exception:
            known = []
        raise ConfigError(name_key, dataset, "a tensorflow-datasets name (e.g. tf_flowers, mnist)",
                          (suggest(dataset.split("/")[0].split(":")[0], known)
                           + " Catalog: https://www.tensorflow.org/datasets/catalog").strip()) from e
    except Exception as e:
        raise DataError(f"{name_key}: cannot load tfds dataset {dataset!r}: {_first_line(e)}") from e


def _prepare(builder, dataset: str, download: bool) -> None:
    """Download and prepare the dataset unless it is ready; one line saying how to get it offline if not."""
    if builder.is_prepared():
        return
    root = str(builder.data_dir_root)
    how = (f"on a connected machine run `tfds build {dataset} --data_dir DIR` (or "
           f"python -c \"import tensorflow_datasets as tfds; tfds.load('{dataset}', data_dir='DIR')\"), "
           f"copy DIR here and pass data.data_dir=DIR data.download=false")
    if not download:
        raise DataError(f"data.data_dir: tfds dataset {dataset!r} is not prepared in '{root}' and "
                        f"data.download=false; {how}")
    if not network_reachable():
        raise DataError(f"data.data_dir: cannot download tfds dataset {dataset!r} (no network) and it is "
                        f"not prepared in '{root}'; {how}")
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise DataError(f"data.data_dir: downloading tfds dataset {dataset!r} into '{root}' failed: "
                        f"{_first_line(e)}; retry, or {how}") from e


def _features(info, opts, dataset: str) -> dict:
    """image_key, label_key (given, else the supervised keys), class_names and image_shape, checked."""
    features = info.features
    sup = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_key = opts.image_key or (sup[0] if sup and isinstance(sup[0], str) else "image")
    label_key = opts.label_key or (sup[1] if sup and isinstance(sup[1], str) else "label")
    keys = list(features.keys()) if hasattr(features, "keys") else []
    for key, value, what in (("image_key", image_key, "an image feature"),
                             ("label_key", label_key, "a ClassLabel feature")):
        if value not in keys:
            raise ConfigError(f"data.{key}", value, f"{what} of {dataset!r}: one of {', '.join(keys)}",
                              suggest(value, keys))
    class_names = list(getattr(features[label_key], "names", None) or [])
    if not class_names:
        raise ConfigError("data.label_key", label_key, f"a ClassLabel feature of {dataset!r} (with class names)")
    shape = tuple(getattr(features[image_key], "shape", ()) or ())
    if len(shape) not in (2, 3):
        raise ConfigError("data.image_key", image_key, f"a 2-D image feature of {dataset!r} (got shape {shape})")
    return {"image_key": image_key, "label_key": label_key, "class_names": class_names, "image_shape": shape}


def _split(info, spec: str | None, key: str) -> Split | None:
    """The split `spec` with its size from the split info (0 when the info has none, e.g. under mock)."""
    if not spec:
        return None
    if not info.splits:
        return Split(tfds_split=spec, size=0)
    try:
        return Split(tfds_split=spec, size=int(info.splits[spec].num_examples))
    except Exception as e:  # unknown split name / bad slice
        raise ConfigError(f"data.{key}", spec, f"a split of this dataset ({', '.join(info.splits)}), "
                          "optionally sliced like 'train[:80%]'") from e


def load_tfds(opts) -> Dataset:
    dataset, name_key = dataset_name(opts)
    data_dir = str(Path(os.path.expandvars(str(opts.data_dir))).expanduser()) if opts.data_dir else None
    builder = _builder(dataset, name_key, data_dir)
    _prepare(builder, dataset, opts.download)
    info = builder.info
    found = _features(info, opts, dataset)
    return Dataset(
        name=f"tfds:{dataset}", class_names=found.pop("class_names"),
        train=_split(info, opts.train_split, "train_split"), val=_split(info, opts.val_split, "val_split"),
        test=_split(info, opts.test_split, "test_split"), source_cfg=opts,
        extra={"dataset": dataset, "data_dir": data_dir, **found},
    )
