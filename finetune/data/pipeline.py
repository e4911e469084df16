"""tf.data input pipelines: decode -> RGB -> resize -> (cache) -> shuffle (or balance) -> batch -> augment.

Yields (images float32 [B, h, w, 3] in 0..255, labels int32 [B], or one-hot float32 [B, k] when MixUp or
CutMix is on). No backbone preprocessing:
the model does it. Between resize and batch, images are uint8 (rounded), which makes the
in-memory cache 4x smaller than float32 would.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from finetune.data import augment as augmentation
from finetune.data.dataset import Dataset, Split
from finetune.errors import ConfigError, DataError
from finetune.registry import lookup

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_BUFFER_BYTES = 512 * 2**20  # cap for the shuffle buffer when the split is not cached in memory
_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def _hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ConfigError("image_size", image_size, "(height, width) in pixels, e.g. (224, 224)") from None
    if h < 1 or w < 1:
        raise ConfigError("image_size", image_size, "(height, width) of positive integers")
    return h, w


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 image [h,w], [h,w,1], [h,w,2] (gray+alpha), [h,w,3] or [h,w,4] (RGBA) -> [h,w,3]."""
    if image.shape.rank == 2:
        image = image[..., None]
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels in (1, 2):
        return tf.image.grayscale_to_rgb(image[..., :1])
    if channels == 4:
        return image[..., :3]
    # Unknown channel count at trace time: decide at run time.
    c = tf.shape(image)[-1]
    return tf.cond(c >= 3, lambda: image[..., :3], lambda: tf.image.grayscale_to_rgb(image[..., :1]))


def resize_uint8(image: tf.Tensor, hw: tuple[int, int]) -> tf.Tensor:
    """RGB uint8 image -> [h, w, 3] uint8, bilinear (antialiased when shrinking)."""
    image = tf.image.resize(image, hw, method="bilinear", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image.set_shape((hw[0], hw[1], 3))
    return image


def _name(path) -> str:
    name = path.item() if isinstance(path, np.ndarray) else path  # numpy_function passes a 0-d array
    return name.decode() if isinstance(name, bytes) else str(name)


def _pil_rgb(path) -> np.ndarray:
    from finetune.data.scan import read_rgb

    return read_rgb(_name(path))


def _needs_pillow(path) -> np.bool_:
    from finetune.data.scan import needs_pillow

    return np.bool_(needs_pillow(_name(path)))


def decode_file(path: tf.Tensor, hw: tuple[int, int], pillow=None) -> tf.Tensor:
    """Image file (jpeg/png/bmp/gif: first frame; gray/RGBA/palette/CMYK/16-bit) -> uint8 [h, w, 3].

    `pillow` (bool tensor): decode with Pillow instead of TensorFlow, for the files TF gets wrong: an
    EXIF orientation (TF ignores it), BMP (TF rejects 1-bit files and returns the palette indices, not
    the colours, of 8-bit palette files), formats TF lacks. None: decided here from the file's header
    (finetune.data.scan.needs_pillow); datasets pass what the pre-flight scan found."""
    if pillow is None:
        pillow = tf.numpy_function(_needs_pillow, [path], tf.bool, stateful=False)
        pillow.set_shape(())
    image = tf.cond(
        tf.cast(pillow, tf.bool),
        lambda: tf.numpy_function(_pil_rgb, [path], tf.uint8, stateful=False),
        lambda: tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False, dtype=tf.uint8))
    image.set_shape((None, None, 3))
    return resize_uint8(image, hw)


def load_image(path: str, image_size) -> tf.Tensor:
    """One image file as float32 [h, w, 3] in 0..255, exactly as the pipelines feed it (for predict)."""
    return tf.cast(decode_file(tf.constant(str(path)), _hw(image_size)), tf.float32)


def estimated_bytes(num_images: int, image_size) -> int:
    """Bytes of `num_images` resized uint8 RGB images (what the in-memory cache holds)."""
    h, w = _hw(image_size)
    return int(num_images) * h * w * 3


# data.cache -> (split size, (h, w), data.cache_max_mb) -> keep the resized split in memory?
CACHE_POLICIES = {
    "memory": lambda size, hw, max_mb: True,
    "off": lambda size, hw, max_mb: False,
    "auto": lambda size, hw, max_mb: 0 < size and estimated_bytes(size, hw) < int(max_mb) * 2**20,
}


# data.sampler -> whether training batches are class-balanced
SAMPLERS = {"none": False, "balanced": True}


def _tfds_elements(dataset: Dataset, split: Split, training: bool, seed: int) -> tf.data.Dataset:
    import tensorflow_datasets as tfds

    extra = dataset.extra
    builder = tfds.builder(extra["dataset"], data_dir=extra.get("data_dir"))
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    ds = builder.as_dataset(split=split.tfds_split, shuffle_files=training, read_config=read_config)
    image_key, label_key = extra["image_key"], extra["label_key"]

    def pick(ex):
        image = ex[image_key]
        if image.dtype != tf.uint8:  # e.g. uint16 scans: rescale to 0..255
            image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
        return to_rgb(image), ex[label_key]

    return ds.map(pick, num_parallel_calls=AUTOTUNE)


def _part(dataset: Dataset, split: str) -> tuple[str, Split]:
    key = lookup(_SPLITS, "split", split)
    part = getattr(dataset, key)
    if part is None:
        raise DataError(f"{dataset.name} has no {key} split; set data.test_split > 0 (or data.test_path / "
                        "the tfds data.test_split) to evaluate on a test set")
    if part.tfds_split is None and part.size == 0:
        raise DataError(f"{dataset.name}: the {key} split is empty; adjust data.val_split/data.test_split")
    return key, part


def _tfds_split(dataset: Dataset, part: Split, hw, training: bool, seed: int, in_memory: bool):
    ds = _tfds_elements(dataset, part, training, seed)
    ds = ds.map(lambda x, y: (resize_uint8(x, hw), tf.cast(y, tf.int32)), num_parallel_calls=AUTOTUNE)
    return ds.ignore_errors(log_warning=True)  # an undecodable example is dropped alone, not its batch


def _file_split(dataset: Dataset, part: Split, hw, training: bool, seed: int, in_memory: bool):
    labels = np.asarray(part.labels, np.int32)
    paths = np.asarray(part.paths, dtype=object).astype(str)
    bmp = np.char.endswith(np.char.lower(paths), ".bmp")
    pillow = bmp | np.asarray(part.pillow, bool) if part.pillow is not None else bmp
    ds = tf.data.Dataset.from_tensor_slices((paths, labels, pillow))
    if training and not in_memory:
        # Not cached: shuffle the (cheap) file names over the whole split before decoding.
        ds = ds.shuffle(int(part.size), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y, pil: (decode_file(p, hw, pil), y), num_parallel_calls=AUTOTUNE)
    # A file that passed the pre-flight scan but fails to decode now (changed since, or a defect only
    # TensorFlow's decoder sees) is dropped alone, with a warning, instead of failing its whole batch.
    return ds.ignore_errors(log_warning=True)


def _array_split(dataset: Dataset, part: Split, hw, training: bool, seed: int, in_memory: bool):
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(part.images, np.uint8), np.asarray(part.labels, np.int32)))
    return ds.map(lambda x, y: (resize_uint8(to_rgb(x), hw), y), num_parallel_calls=AUTOTUNE)


def _elements(dataset: Dataset, key: str, part: Split, hw, training: bool, seed: int, in_memory: bool):
    """(uint8 [h, w, 3], int32) elements of one split, whichever form it comes in."""
    for held, read in ((part.tfds_split, _tfds_split), (part.paths, _file_split), (part.images, _array_split)):
        if held is not None:
            return read(dataset, part, hw, training, seed, in_memory)
    raise DataError(f"{dataset.name}: the {key} split has neither files, arrays nor a tfds split")


def _class_counts(part: Split, ds: tf.data.Dataset) -> np.ndarray:
    """Images per class of a split: from its labels, or (a tfds split) one pass over its labels."""
    labels = part.labels
    if labels is None:
        labels = np.fromiter((int(y) for y in ds.map(lambda x, y: y).as_numpy_iterator()), np.int64)
    return np.bincount(np.asarray(labels, np.int64).reshape(-1))


def _balanced(streams: list[tf.data.Dataset], seed: int) -> tf.data.Dataset:
    """One endless stream that draws each class with equal probability (each class's stream repeats)."""
    return tf.data.Dataset.sample_from_datasets(streams, weights=[1.0 / len(streams)] * len(streams), seed=seed,
                                                rerandomize_each_iteration=True)


def _balanced_files(part: Split, hw, seed: int) -> tf.data.Dataset:
    """data.sampler=balanced on files not kept in memory: the file names are balanced before decoding, so
    every drawn image is decoded once."""
    labels = np.asarray(part.labels, np.int32)
    paths = np.asarray(part.paths, dtype=object).astype(str)
    bmp = np.char.endswith(np.char.lower(paths), ".bmp")
    pillow = bmp | np.asarray(part.pillow, bool) if part.pillow is not None else bmp
    streams = []
    for c in np.unique(labels):
        keep = labels == c
        streams.append(tf.data.Dataset.from_tensor_slices((paths[keep], labels[keep], pillow[keep]))
                       .shuffle(int(keep.sum()), seed=seed + int(c), reshuffle_each_iteration=True).repeat())
    ds = _balanced(streams, seed)
    return ds.map(lambda p, y, pil: (decode_file(p, hw, pil), y),
                  num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)


def _balanced_elements(part: Split, ds: tf.data.Dataset, seed: int, buffer: int) -> tf.data.Dataset:
    """data.sampler=balanced on decoded elements (cached in memory, arrays, tfds): one filtered stream per
    class that has training images."""
    counts = _class_counts(part, ds)
    streams = []
    for c in np.flatnonzero(counts):
        stream = ds.filter(lambda x, y, c=int(c): tf.equal(tf.cast(y, tf.int64), c))
        size = int(counts[c])
        streams.append(stream.shuffle(max(2, min(size, buffer or size)), seed=seed + int(c),
                                      reshuffle_each_iteration=True).repeat())
    return _balanced(streams, seed)


def _shuffle_buffer(part: Split, hw, batch_size: int, in_memory: bool) -> int:
    size = int(part.size)
    if in_memory and size > 0:
        return size  # the buffer shares the cached tensors: a full shuffle costs little memory
    if part.paths is not None:
        return 0  # already shuffled file names
    buffer = max(batch_size * 4, min(SHUFFLE_BUFFER_BYTES // (hw[0] * hw[1] * 3), 10_000))
    return min(buffer, size) if size > 0 else buffer


def make_pipeline(dataset: Dataset, split: str, image_size, batch_size: int, *, training: bool, seed: int,
                  cache: str = "auto", cache_max_mb: int = 2048, augment=None,
                  sampler: str = "none", one_hot: bool = False, shuffle: bool = True) -> tf.data.Dataset:
    """A batched tf.data pipeline for one split of `dataset`.

    Yields (float32 [B, h, w, 3] in 0..255, int32 [B]). Training pipelines shuffle (seeded,
    reshuffled every epoch) and augment (finetune.data.augment: `augment` is the `augment` group's config or
    a policy name; MixUp/CutMix make its labels one-hot); others keep a fixed order (`one_hot`: one-hot labels,
    to match a training pipeline that mixes; `shuffle=False`: a training pipeline in the split's order, for
    augmented views aligned with the images). `cache`:
    "memory" caches the resized split in memory, "off" never, "auto" when it needs < cache_max_mb MiB.
    `sampler` (training only): "balanced" draws every class with equal probability, endlessly (oversampling
    the small classes); "none" passes over the split as it is.
    """
    key, part = _part(dataset, split)
    hw, seed = _hw(image_size), int(seed)
    in_memory = lookup(CACHE_POLICIES, "data.cache", cache)(int(part.size), hw, cache_max_mb)
    balanced = training and lookup(SAMPLERS, "data.sampler", sampler)
    if balanced and part.paths is not None and not in_memory:
        ds = _balanced_files(part, hw, seed)
    else:
        ds = _elements(dataset, key, part, hw, training and shuffle and not balanced, seed, in_memory)
        if in_memory:
            ds = ds.cache()
        if balanced:
            ds = _balanced_elements(part, ds, seed, _shuffle_buffer(part, hw, int(batch_size), True))
        elif training and shuffle:
            buffer = _shuffle_buffer(part, hw, int(batch_size), in_memory)
            if buffer > 1:
                ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(int(batch_size))
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.int32)), num_parallel_calls=AUTOTUNE)
    if training:
        ds = augmentation.augment_batches(ds, augmentation.as_config(augment), seed, dataset.num_classes)
    elif one_hot:
        ds = ds.map(lambda x, y: (x, tf.one_hot(y, dataset.num_classes)), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
