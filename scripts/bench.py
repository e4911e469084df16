#!/usr/bin/env python
"""finetune against the plain hand-written Keras transfer-learning loop, side by side, in one process.

    python scripts/bench.py                              # rows 1-5, 3 repetitions -> docs/benchmarks.md + .json
    python scripts/bench.py --rows 1,4 --repeats 5 --out /tmp/bench.md
    python scripts/bench.py --smoke --out /tmp/bench.md  # tiny sizes (< 1 min): checks the plumbing only

--smoke: VGG16 at 32 px (19 layers: graph tracing of MobileNetV2's 155 layers alone took ~10 s a model
on 2 CPU cores, ~110 s for the smoke run), 24 images, 2 epochs, 1 repetition, a sweep of 2 trials.

The full run takes long on a small CPU machine (row 1's ResNet50 at 224 px for 20 epochs dominates).

Both sides, in each row:
  * see the same images: generated shapes (finetune.data.shapes.ensure_shapes) written once as PNG class
    folders at the row's input size, split once per class into train/ and val/ folders (last 20% of each
    class -> val). finetune reads them with data=folder data.path=<train> data.val_path=<val>; the plain
    loop with keras.utils.image_dataset_from_directory (rows 1, 2, 4) or as numpy arrays (row 3);
  * use the same backbone, input size, batch size, epochs, head, optimizer (Adam) and learning rate,
    random backbone weights (backbone.weights=null: nothing can be downloaded here; same speed as ImageNet);
  * run in this process: finetune through Hydra's compose API and finetune.commands.train.run /
    finetune.commands.extract.run (so neither side pays Python/TensorFlow start-up), the plain loop as the
    Keras transfer-learning guide writes it: base = keras.applications.<Net>(include_top=False,
    pooling="avg"), base.trainable = False, base(x, training=False) for a frozen backbone, model.fit.
  A repetition runs both sides, alternating which goes first; keras.backend.clear_session() and
  its gc.collect() run before each side, untimed. One untimed warm-up (imports, MLflow store, a tiny Keras
  fit) runs before everything, so neither side pays first-use costs.

What each number is (medians over --repeats repetitions; the JSON also holds every repetition):
  1. frozen backbone, 1/5/20 epochs: wall time of the whole call. plain = image_dataset_from_directory
     (.cache().prefetch()) + build + compile + fit(train, validation_data=val). finetune = train.run(cfg):
     everything `finetune train` does in-process (data scan, pipelines, MLflow run and params, fit, final
     evaluation and per-class report, plots, model save), with freeze=all, trainer.bn_recalibration=false,
     early stopping off, tracking.log_model=false. Ratio = plain / finetune. "Backbone pass" = median
     seconds of one model.predict of preprocessing + backbone over the training images held as a numpy
     array, after one untimed pass; finetune's time is also given in those units. Each finetune call gets
     an empty $FINETUNE_CACHE_DIR (a cold feature cache) and trainer.feature_cache=auto when finetune has
     that option. "After last epoch" = finetune's time from its last epoch's metrics to the end of its
     MLflow run (final evaluation, reports, plots, saves); "feature cache" = the run's feature_cache tag
     (miss/hit/refresh; None: not used). Target (at the longest epoch count): ratio >= 12 and <= 1.5
     backbone passes.
  2. head sweep: 8 trials (head linear|mlp x 4 learning rates) on one frozen backbone; total wall time of
     the 8 trials. plain: the datasets once, then per trial clear_session + build + compile + fit.
     finetune: 8 train.run calls in a row, sharing one $FINETUNE_CACHE_DIR that is empty at the start of
     the sweep (as `finetune train -m` would, but in this process: the CLI's default
     trainer.isolate_sweep_jobs=true adds one Python/TF start-up per trial, not measured). Each trial's
     time and feature_cache tag are listed. Target >= 6x.
  3. fine-tuning the last N blocks / the whole network: whole-epoch images/s = training images / median
     whole-epoch time, where a whole epoch runs from one epoch's end to the next's (training steps +
     validation + callbacks), the first epoch (graph tracing) left out. plain: model.fit on numpy arrays,
     epoch ends from a callback; finetune: the timestamps of the per-epoch metrics its run logs to MLflow.
     The plain loop trains the same layers: the last N blocks of finetune's block map, counted in layers;
     BatchNorm layers run in training mode exactly where they train (finetune's batchnorm=frozen policy).
     GFLOP/s = (train images x training FLOPs/image + val images x forward FLOPs/image) / epoch time.
     Forward FLOPs: analytic, 2 x multiply-adds of the Conv2D, DepthwiseConv2D and Dense layers (others
     ignored); training FLOPs/image = forward + 2 x forward of the trained layers (input and weight
     gradients). Share of peak = GFLOP/s / this machine's fp32 peak, measured here as the faster of a
     square float32 tf.matmul and a 3x3 float32 tf.nn.conv2d, repeated eagerly after one warm-up call.
     Short epochs: few training images (a few steps an epoch); long: 8x more. Targets: finetune/plain
     >= 1.3 on short epochs, >= 1.0 on long ones.
  4. extraction: images/s of `finetune extract` (extract.run over the train and val folders, writing its
     .npz, manifest and MLflow run) vs model.predict of preprocessing + backbone (pooling avg) over
     image_dataset_from_directory of the same images; both timed from model build to the features in
     hand. Ratio = finetune rate / plain rate; target >= 0.95.
  5. peak memory: for each side of each case of rows 1-4, the largest increase of this process's resident
     memory (psutil, sampled every 20 ms) over its value when the side started, max over repetitions.
     In-process, so memory TensorFlow kept from earlier cases is reused and not counted again: a lower
     bound on each side's own peak, comparable between the two sides of one case.
  6. input pipeline and epoch boundaries (a frozen backbone trained on images, as finetune does whenever
     augmentation is on or part of the backbone trains; MobileNetV2 224 px, 10 steps an epoch, no
     validation): plain = image_dataset_from_directory(.cache().prefetch()) + model.fit(epochs=E), a new
     iterator every epoch, as the guide writes it; finetune = its own train pipeline
     (finetune.data.make_pipeline via finetune.train.inputs.image_inputs: parallel decode/resize, memory cache, prefetch,
     .repeat()) + fit(steps_per_epoch) as `finetune train` runs it, on finetune's assembled model. Step s =
     median time between consecutive batch ends inside an epoch; epoch s = mean time from one epoch's end
     to the next (a mean: stalls hit some epochs, not all); both leave the first epoch (tracing, cache
     fill) out. Efficiency = steps x step s / epoch s (1.0: an epoch costs exactly its steps; target
     >= 0.95 for finetune). Pipeline alone: images/s
     of iterating each side's training pipeline with no model, after one untimed epoch (cache filled);
     finetune's also with data.cache=off (decoding every epoch). Ratio = pipeline images/s / the model's
     step images/s; target >= 3.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ALL_ROWS = (1, 2, 3, 4, 5, 6)
ROW_TITLES = {
    1: "Frozen backbone: wall time, plain / finetune",
    2: "Head sweep on one frozen backbone: total time, plain / finetune",
    3: "Fine-tuning: whole-epoch images/s, finetune / plain (numpy-fed)",
    4: "Feature extraction: images/s, finetune extract / Keras predict",
    5: "Peak resident memory increase per side",
    6: "Input pipeline and epoch boundaries: whole-epoch time vs the per-step rate",
}
# keras.applications constructor and preprocessing module of each backbone the benchmark uses
PLAIN_APPS = {"mobilenet_v2": ("MobileNetV2", "mobilenet_v2"), "resnet50": ("ResNet50", "resnet50"),
              "vgg16": ("VGG16", "vgg16")}
HEAD_LAYERS = {"linear": {"dropout": 0.2}, "mlp": {"units": 256, "dropout": 0.3}}  # conf/head/*.yaml


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""
    classes: tuple
    per_class: int  # images per class of rows 1, 2, 4
    val_fraction: float
    batch_size: int
    frozen_backbones: tuple  # ((backbone, px), ...): rows 1 and 4
    frozen_epochs: tuple  # row 1
    frozen_lr: float
    sweep_backbone: tuple  # (backbone, px): row 2
    sweep_trials: tuple  # ((head, lr), ...)
    sweep_epochs: int
    tune_backbone: tuple  # (backbone, px): row 3
    tune_freezes: tuple  # ((policy, n), ...)
    epoch_lengths: tuple  # (("short"|"long", images per class), ...)
    tune_epochs: int
    tune_lr: float
    matmul_n: int
    conv_shape: tuple  # (batch, height, width, channels)
    peak_calls: int
    stall_backbone: tuple = ("mobilenet_v2", 224)  # (backbone, px): row 6
    stall_per_class: int = 80  # 5 classes x 80 x 0.8 = 320 training images = 10 steps of 32
    stall_epochs: int = 8


FULL = Plan(classes=("circle", "square", "triangle", "star", "cross"), per_class=60, val_fraction=0.2,
            batch_size=32, frozen_backbones=(("mobilenet_v2", 128), ("resnet50", 224)),
            frozen_epochs=(1, 5, 20), frozen_lr=1e-3, sweep_backbone=("mobilenet_v2", 128),
            sweep_trials=tuple((head, lr) for head in ("linear", "mlp") for lr in (1e-3, 3e-3, 1e-2, 3e-2)),
            sweep_epochs=5, tune_backbone=("mobilenet_v2", 128), tune_freezes=(("last_n", 2), ("none", 0)),
            epoch_lengths=(("short", 20), ("long", 160)), tune_epochs=3, tune_lr=1e-4,
            matmul_n=2048, conv_shape=(32, 56, 56, 128), peak_calls=8)
SMOKE_BACKBONE = ("vgg16", 32)
SMOKE = Plan(classes=("circle", "square", "triangle"), per_class=8, val_fraction=0.25, batch_size=8,
             frozen_backbones=(SMOKE_BACKBONE,), frozen_epochs=(2,), frozen_lr=1e-3,
             sweep_backbone=SMOKE_BACKBONE, sweep_trials=(("linear", 1e-3), ("mlp", 1e-3)),
             sweep_epochs=1, tune_backbone=SMOKE_BACKBONE, tune_freezes=(("last_n", 2),),
             epoch_lengths=(("short", 8),), tune_epochs=2, tune_lr=1e-4,
             matmul_n=512, conv_shape=(4, 28, 28, 64), peak_calls=3,
             stall_backbone=SMOKE_BACKBONE, stall_per_class=8, stall_epochs=3)


@dataclass
class Folders:
    all: Path  # one sub-folder per class, every image
    train: Path
    val: Path
    num_train: int
    num_val: int


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def finetune_commit() -> str | None:
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO / ".git" / ref[5:]).read_text().strip()[:12]
        return ref[:12]
    except OSError:
        return None


def machine_info() -> dict:
    import keras
    import tensorflow as tf

    return {"cpu": cpu_model(), "cores": usable_cores(), "logical_cpus": os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "platform": platform.platform(), "finetune_commit": finetune_commit(),
            "finetune_feature_cache_option": feature_cache_supported(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def measure_fp32_peak(plan: Plan) -> dict:
    """GFLOP/s of a square float32 matmul and of a 3x3 float32 conv2d, eager, after one warm-up call."""
    import tensorflow as tf

    n = plan.matmul_n
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    batch, height, width, channels = plan.conv_shape
    images, kernel = tf.random.normal(plan.conv_shape), tf.random.normal((3, 3, channels, channels))

    def rate(op, flops: float) -> float:
        op().numpy()
        start = time.perf_counter()
        for _ in range(plan.peak_calls):
            result = op()
        float(tf.reduce_sum(result[..., :1]))  # waits for the last call
        return flops * plan.peak_calls / (time.perf_counter() - start) / 1e9

    matmul = rate(lambda: tf.linalg.matmul(a, b), 2.0 * n ** 3)
    conv = rate(lambda: tf.nn.conv2d(images, kernel, 1, "SAME"),
                2.0 * batch * height * width * 9 * channels * channels)
    return {"matmul_gflops": matmul, "matmul_shape": [n, n], "conv2d_gflops": conv,
            "conv2d_input": list(plan.conv_shape), "conv2d_kernel": [3, 3, channels, channels],
            "peak_gflops": max(matmul, conv)}


# ---------------------------------------------------------------------------------------------- data
def split_into_train_val(source: Path, dest: Path, val_fraction: float) -> tuple[int, int]:
    """Hard-link (or copy) each class's images: the last `val_fraction` of each class -> dest/val."""
    counts = {"train": 0, "val": 0}
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.png"))
        num_val = max(1, round(len(files) * val_fraction))
        for split, part in (("train", files[:-num_val]), ("val", files[-num_val:])):
            (dest / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for file in part:
                target = dest / split / class_dir.name / file.name
                try:
                    os.link(file, target)
                except OSError:
                    shutil.copyfile(file, target)
            counts[split] += len(part)
    return counts["train"], counts["val"]


def load_arrays(folder: Path, px: int):
    """(float32 [N, px, px, 3] in 0..255, int32 [N]) of a class-folder tree, classes in sorted order."""
    import numpy as np
    from PIL import Image

    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for file in sorted(class_dir.glob("*.png")):
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB").resize((px, px)), dtype=np.float32))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)


# ------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRssIncrease:
    """Context manager: the largest increase of this process's resident memory while inside (MiB)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.increase_mb = 0.0

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.increase_mb = (self.peak - self.start) / 2**20
        return False


# --------------------------------------------------------------------------------------- plain side
def plain_backbone(name: str, px: int):
    import keras

    constructor = getattr(keras.applications, PLAIN_APPS[name][0])
    return constructor(weights=None, input_shape=(px, px, 3), include_top=False, pooling="avg")


def plain_preprocess(name: str):
    import keras

    module = getattr(keras.applications, PLAIN_APPS[name][1])
    return keras.layers.Lambda(module.preprocess_input, name="preprocess")


def plain_head(x, head: str, num_classes: int):
    import keras

    spec = HEAD_LAYERS[head]
    if "units" in spec:
        x = keras.layers.Dense(spec["units"], activation="relu")(x)
    x = keras.layers.Dropout(spec["dropout"])(x)
    return keras.layers.Dense(num_classes, activation="softmax")(x)


def plain_classifier(name: str, px: int, num_classes: int, head: str = "linear", trainable_layers: int = 0):
    """The guide's model: inputs -> preprocess -> base -> head. trainable_layers=0: frozen base called with
    training=False; else only the last `trainable_layers` layers of the base train."""
    import keras

    base = plain_backbone(name, px)
    inputs = keras.Input(shape=(px, px, 3))
    x = plain_preprocess(name)(inputs)
    if trainable_layers:
        base.trainable = True
        for layer in base.layers[:len(base.layers) - trainable_layers]:
            layer.trainable = False
        x = base(x)
    else:
        base.trainable = False
        x = base(x, training=False)
    return keras.Model(inputs, plain_head(x, head, num_classes))


def plain_compile(model, lr: float) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])


def plain_feature_model(name: str, px: int):
    import keras

    inputs = keras.Input(shape=(px, px, 3))
    return keras.Model(inputs, plain_backbone(name, px)(plain_preprocess(name)(inputs), training=False))


def plain_image_datasets(folders: Folders, px: int, batch_size: int):
    import keras
    import tensorflow as tf

    def folder(path, shuffle):
        ds = keras.utils.image_dataset_from_directory(path, image_size=(px, px), batch_size=batch_size,
                                                      shuffle=shuffle, seed=0, verbose=False)
        return ds.cache().prefetch(tf.data.AUTOTUNE)

    return folder(folders.train, True), folder(folders.val, False)


def plain_fit_frozen(folders: Folders, name: str, px: int, num_classes: int, plan: Plan, trials) -> dict:
    """Datasets once, then per (head, lr, epochs) trial: build, compile, fit. Seconds of all of it."""
    import keras

    start = time.perf_counter()
    train_ds, val_ds = plain_image_datasets(folders, px, plan.batch_size)
    for head, lr, epochs in trials:
        keras.backend.clear_session()
        model = plain_classifier(name, px, num_classes, head)
        plain_compile(model, lr)
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0)
    return {"seconds": time.perf_counter() - start}


def epoch_clock():
    """A Keras callback that records perf_counter() at every epoch end in `.ends`."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())

    return EpochClock()


def steady_epoch_seconds(ends: list[float]) -> float | None:
    """Median time from one epoch's end to the next's, the first epoch (tracing) left out."""
    gaps = [max(b - a, 1e-3) for a, b in zip(ends, ends[1:])]
    return median(gaps) if gaps else None


def plain_fit_arrays(arrays, name: str, px: int, num_classes: int, trainable_layers: int, plan: Plan) -> dict:
    (x, y), (xv, yv) = arrays
    start = time.perf_counter()
    model = plain_classifier(name, px, num_classes, "linear", trainable_layers)
    plain_compile(model, plan.tune_lr)
    clock = epoch_clock()
    model.fit(x, y, batch_size=plan.batch_size, epochs=plan.tune_epochs, validation_data=(xv, yv),
              callbacks=[clock], verbose=0)
    return {"seconds": steady_epoch_seconds(clock.ends), "total_s": time.perf_counter() - start,
            "epoch_ends_s": [t - start for t in clock.ends]}


def plain_extract(folders: Folders, name: str, px: int, plan: Plan) -> dict:
    import keras

    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(folders.all, image_size=(px, px), batch_size=plan.batch_size,
                                                  shuffle=False, verbose=False)
    features = plain_feature_model(name, px).predict(ds, verbose=0)
    return {"seconds": time.perf_counter() - start, "images": int(features.shape[0])}


def backbone_pass_seconds(folders: Folders, name: str, px: int, plan: Plan, repeats: int) -> float:
    """Median seconds of one inference pass of preprocess + backbone over the training images (numpy)."""
    import keras

    x, _ = load_arrays(folders.train, px)
    keras.backend.clear_session()
    model = plain_feature_model(name, px)
    model.predict(x, batch_size=plan.batch_size, verbose=0)  # traces every batch shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(x, batch_size=plan.batch_size, verbose=0)
        times.append(time.perf_counter() - start)
    return median(times)


# ------------------------------------------------------------------------------------ finetune side
def feature_cache_supported() -> bool:
    from finetune.config.schema import TrainerConfig

    return hasattr(TrainerConfig, "__dataclass_fields__") and "feature_cache" in TrainerConfig.__dataclass_fields__


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from finetune.config.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench"):
        return hydra_compose(config_name=config_name, overrides=overrides)


@contextlib.contextmanager
def quiet_stdout():
    """finetune's (and Keras') printed reports go nowhere; progress goes to stderr."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


@contextlib.contextmanager
def finetune_cache_dir(path: Path):
    """$FINETUNE_CACHE_DIR set to `path` while inside (finetune's feature cache lives under it)."""
    old = os.environ.get("FINETUNE_CACHE_DIR")
    os.environ["FINETUNE_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FINETUNE_CACHE_DIR", None)
        else:
            os.environ["FINETUNE_CACHE_DIR"] = old


class Bench:
    """What every row shares: the plan, the work folder (data, MLflow store, run outputs), both sides' calls."""

    def __init__(self, plan: Plan, work: Path, repeats: int):
        self.plan, self.work, self.repeats = plan, work, repeats
        self.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
        self.folders: dict[tuple[int, int], Folders] = {}
        self.counter = 0

    def data(self, px: int, per_class: int) -> Folders:
        key = (px, per_class)
        if key not in self.folders:
            from finetune.data.shapes import ensure_shapes

            source = ensure_shapes(list(self.plan.classes), per_class, px, 0, cache_dir=self.work / "shapes",
                                   verbose=False)
            dest = self.work / "data" / f"{px}px_{per_class}"
            num_train, num_val = split_into_train_val(source, dest, self.plan.val_fraction)
            self.folders[key] = Folders(all=source, train=dest / "train", val=dest / "val",
                                        num_train=num_train, num_val=num_val)
        return self.folders[key]

    def fresh_path(self, kind: str) -> Path:
        self.counter += 1
        return self.work / kind / f"{self.counter:04d}"

    def tracking_overrides(self) -> list[str]:
        return [f"tracking.uri={self.tracking_uri}", "tracking.log_model=false", "tracking.experiment=bench"]

    def train_overrides(self, folders: Folders, name: str, px: int) -> list[str]:
        return [f"backbone={name}", "backbone.weights=null", f"backbone.input_shape=[{px},{px}]",
                "data=folder", f"data.path={folders.train}", f"data.val_path={folders.val}",
                f"trainer.batch_size={self.plan.batch_size}", "trainer.verbose=0", "trainer.seed=0",
                "trainer.early_stopping.enabled=false", "trainer.bn_recalibration=false", "optimizer=adam",
                *self.tracking_overrides()]

    def finetune_train(self, overrides: list[str], cache: Path | None = None) -> dict:
        """train.run in-process; seconds of the call, plus what its MLflow run recorded of its phases.
        `cache`: the $FINETUNE_CACHE_DIR to use (default: a new, empty one)."""
        from finetune.commands import train
        from finetune.sweep.parent import RUN_ID_FILE

        cfg = compose("train", overrides)
        out = self.fresh_path("runs")
        with finetune_cache_dir(cache or self.fresh_path("feature_cache")), quiet_stdout():
            start = time.perf_counter()
            train.run(cfg, out)
            seconds = time.perf_counter() - start
        run_id = (out / RUN_ID_FILE).read_text().strip()
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": seconds, **self.run_phases(run_id)}

    def run_phases(self, run_id: str) -> dict:
        """From the MLflow run: epoch end times (s after the run started) and the time after the last."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        run = client.get_run(run_id)
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        ends = [m.timestamp / 1000 for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]
        return {"run_id": run_id, "epoch_ends_s": [round(t - start, 3) for t in ends],
                "after_last_epoch_s": round(end - ends[-1], 3) if ends else None,
                "feature_cache": run.data.tags.get("feature_cache")}  # hit / miss / refresh; None: not used

    def finetune_extract(self, folders: Folders, name: str, px: int) -> dict:
        from finetune.commands import extract

        out = self.fresh_path("extract")
        cfg = compose("extract", [f"backbone={name}", "backbone.weights=null", f"backbone.input_shape=[{px},{px}]",
                                  "data=folder", f"data.path={folders.train}", f"data.val_path={folders.val}",
                                  f"extract.batch_size={self.plan.batch_size}", f"extract.output={out}",
                                  *self.tracking_overrides()])
        with finetune_cache_dir(self.fresh_path("feature_cache")), quiet_stdout():
            start = time.perf_counter()
            manifest = extract.run(cfg, out)
            seconds = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        return {"seconds": seconds, "images": int(sum(manifest["counts"].values()))}

    # -- running both sides ------------------------------------------------------------------------
    def both_sides(self, label: str, plain, finetune) -> dict:
        """{"plain": [sample, ...], "finetune": [...]}: each side `repeats` times, alternating which goes
        first; a sample is the side's result dict plus "rss_mb" (peak resident memory increase)."""
        import keras

        samples = {"plain": [], "finetune": []}
        sides = {"plain": plain, "finetune": finetune}
        for rep in range(self.repeats):
            order = ("plain", "finetune") if rep % 2 == 0 else ("finetune", "plain")
            for side in order:
                keras.backend.clear_session()  # and gc.collect(): the last side's garbage is not charged
                progress(f"{label}: {side}, repetition {rep + 1}/{self.repeats}")
                with PeakRssIncrease() as memory:
                    result = sides[side](rep)
                result["rss_mb"] = round(memory.increase_mb, 1)
                samples[side].append(result)
                shown = f"{result['seconds']:.2f} s" if result.get("seconds") is not None else "no time"
                progress(f"{label}: {side}, repetition {rep + 1}/{self.repeats}: {shown}, "
                         f"peak RSS +{result['rss_mb']:.0f} MiB")
        return samples


def warm_up(bench: Bench) -> None:
    """Untimed: imports of both sides, the MLflow store's tables, TensorFlow's runtime (a tiny fit)."""
    import keras
    import numpy as np

    import finetune.commands.extract  # noqa: F401
    import finetune.commands.train  # noqa: F401
    import finetune.train.reports  # noqa: F401 - matplotlib, sklearn
    import finetune.train.run  # noqa: F401
    from finetune import tracking

    tracking.use_experiment(compose("train", bench.tracking_overrides()).tracking)
    inputs = keras.Input(shape=(8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    plain_compile(model, 1e-3)
    data = np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32)
    model.fit(*data, epochs=1, verbose=0)
    model.predict(data[0], verbose=0)
    keras.backend.clear_session()


# -------------------------------------------------------------------------------------------- FLOPs
def layer_forward_flops(layer) -> int:
    """2 x multiply-adds of one Conv2D / DepthwiseConv2D / Dense layer for one image; 0 for others."""
    import keras

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        _, height, width, _ = layer.output.shape
        kh, kw = layer.kernel_size
        return 2 * height * width * kh * kw * layer.input.shape[-1] * layer.depth_multiplier
    if isinstance(layer, keras.layers.Conv2D):
        _, height, width, _ = layer.output.shape
        kh, kw = layer.kernel_size
        return 2 * height * width * kh * kw * (layer.input.shape[-1] // layer.groups) * layer.filters
    if isinstance(layer, keras.layers.Dense):
        return 2 * layer.input.shape[-1] * layer.units
    return 0


def trained_layers_and_flops(name: str, px: int, num_classes: int, policy: str, n: int) -> dict:
    """How many trailing backbone layers train under finetune's freeze policy (its block map, counted in
    layers), and the forward / training FLOPs per image of backbone + linear head (analytic count)."""
    import keras

    from finetune.model.backbones import block_map, get_spec

    base = plain_backbone(name, px)
    blocks = block_map(get_spec(name), base)
    chosen = blocks if policy == "none" else blocks[len(blocks) - n:]
    trainable = sum(len(layers) for _, layers in chosen)
    per_layer = [layer_forward_flops(layer) for layer in base.layers]
    head = 2 * base.output.shape[-1] * num_classes
    forward = sum(per_layer) + head
    trained = sum(per_layer[len(per_layer) - trainable:]) + head
    keras.backend.clear_session()
    return {"trainable_layers": trainable, "forward_flops": forward, "train_flops": forward + 2 * trained}


# ---------------------------------------------------------------------------------------------- rows
def side_summary(samples: dict, key: str = "seconds") -> dict:
    entry = {}
    for side, results in samples.items():
        values = [r[key] for r in results if r.get(key) is not None]
        entry[f"{side}_s"] = median(values) if values else None
        entry[f"{side}_s_all"] = [round(v, 4) for v in values]
        entry[f"{side}_peak_rss_mb"] = max(r["rss_mb"] for r in results)
    return entry


def ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


def target_check(value, threshold: float, applies: bool = True):
    return (value is not None and value >= threshold) if applies else None


def row_frozen(bench: Bench) -> list[dict]:
    plan, entries = bench.plan, []
    extra = ["trainer.feature_cache=auto"] if feature_cache_supported() else []
    for name, px in plan.frozen_backbones:
        folders = bench.data(px, plan.per_class)
        progress(f"row 1 {name} {px}px: one backbone pass over {folders.num_train} training images")
        pass_s = backbone_pass_seconds(folders, name, px, plan, bench.repeats)
        for epochs in plan.frozen_epochs:
            label = f"row 1 {name} {px}px {epochs} epoch(s)"
            overrides = [*bench.train_overrides(folders, name, px), "freeze=all", "head=linear",
                         f"optimizer.lr={plan.frozen_lr}", f"trainer.epochs={epochs}", *extra]
            samples = bench.both_sides(
                label,
                plain=lambda rep: plain_fit_frozen(folders, name, px, len(plan.classes), plan,
                                                   [("linear", plan.frozen_lr, epochs)]),
                finetune=lambda rep: bench.finetune_train(overrides))
            entry = {"case": f"{name} {px}px, {epochs} epoch(s)", "backbone": name, "px": px, "epochs": epochs,
                     "train_images": folders.num_train, "val_images": folders.num_val, **side_summary(samples)}
            entry["ratio"] = ratio(entry["plain_s"], entry["finetune_s"])
            entry["ratio_kind"] = "plain/finetune"
            entry["backbone_pass_s"] = pass_s
            entry["finetune_backbone_passes"] = ratio(entry["finetune_s"], pass_s)
            entry["finetune_after_last_epoch_s"] = median(
                [r["after_last_epoch_s"] for r in samples["finetune"] if r.get("after_last_epoch_s") is not None]
                or [0.0])
            entry["finetune_feature_cache"] = ",".join(sorted({str(r.get("feature_cache"))
                                                               for r in samples["finetune"]}))
            longest = epochs == max(plan.frozen_epochs)
            entry["target"] = "ratio >= 12 and <= 1.5 backbone passes" if longest else None
            entry["target_met"] = (target_check(entry["ratio"], 12) and entry["finetune_backbone_passes"] <= 1.5
                                   if longest else None)
            entries.append(entry)
    return entries


def row_head_sweep(bench: Bench) -> list[dict]:
    plan = bench.plan
    name, px = plan.sweep_backbone
    folders = bench.data(px, plan.per_class)
    extra = ["trainer.feature_cache=auto"] if feature_cache_supported() else []
    trial_overrides = [[*bench.train_overrides(folders, name, px), "freeze=all", f"head={head}",
                        f"optimizer.lr={lr}", f"trainer.epochs={plan.sweep_epochs}", *extra]
                       for head, lr in plan.sweep_trials]

    def finetune_sweep(rep: int) -> dict:
        cache = bench.fresh_path("feature_cache")  # empty at the start, shared by the sweep's trials
        trials = [bench.finetune_train(overrides, cache=cache) for overrides in trial_overrides]
        return {"seconds": sum(t["seconds"] for t in trials), "trial_s": [round(t["seconds"], 3) for t in trials],
                "trial_feature_cache": [t["feature_cache"] for t in trials]}

    samples = bench.both_sides(
        f"row 2 {name} {px}px sweep of {len(plan.sweep_trials)}",
        plain=lambda rep: plain_fit_frozen(folders, name, px, len(plan.classes), plan,
                                           [(head, lr, plan.sweep_epochs) for head, lr in plan.sweep_trials]),
        finetune=finetune_sweep)
    entry = {"case": f"{name} {px}px, {len(plan.sweep_trials)} trials x {plan.sweep_epochs} epoch(s)",
             "backbone": name, "px": px, "trials": [f"head={h} lr={lr:g}" for h, lr in plan.sweep_trials],
             "epochs": plan.sweep_epochs, "train_images": folders.num_train, **side_summary(samples)}
    entry["finetune_trial_s"] = samples["finetune"][-1]["trial_s"]
    entry["finetune_trial_feature_cache"] = samples["finetune"][-1]["trial_feature_cache"]
    entry["ratio"] = ratio(entry["plain_s"], entry["finetune_s"])
    entry["ratio_kind"] = "plain/finetune"
    entry["target"] = "ratio >= 6"
    entry["target_met"] = target_check(entry["ratio"], 6)
    return [entry]


def row_fine_tuning(bench: Bench, peak_gflops: float | None) -> list[dict]:
    plan, entries = bench.plan, []
    name, px = plan.tune_backbone
    num_classes = len(plan.classes)
    for policy, n in plan.tune_freezes:
        flops = trained_layers_and_flops(name, px, num_classes, policy, n)
        trainable = flops["trainable_layers"]
        freeze = ["freeze=none"] if policy == "none" else ["freeze=last_n", f"freeze.n={n}"]
        what = "whole network" if policy == "none" else f"last {n} block(s)"
        for length, per_class in plan.epoch_lengths:
            folders = bench.data(px, per_class)
            arrays = load_arrays(folders.train, px), load_arrays(folders.val, px)
            overrides = [*bench.train_overrides(folders, name, px), *freeze, "head=linear",
                         f"optimizer.lr={plan.tune_lr}", f"trainer.epochs={plan.tune_epochs}"]

            def finetune_epochs(rep: int) -> dict:
                result = bench.finetune_train(overrides)
                result["total_s"], result["seconds"] = result["seconds"], steady_epoch_seconds(result["epoch_ends_s"])
                if result["seconds"] is None:  # no per-epoch record: the whole call per epoch
                    result["seconds"] = result["total_s"] / plan.tune_epochs
                return result

            samples = bench.both_sides(
                f"row 3 {name} {px}px {what}, {length} epochs",
                plain=lambda rep: plain_fit_arrays(arrays, name, px, num_classes, trainable, plan),
                finetune=finetune_epochs)
            entry = {"case": f"{name} {px}px, {what}, {length} epochs ({folders.num_train} images)",
                     "backbone": name, "px": px, "freeze": policy, "n": n,
                     "epoch_length": length, "train_images": folders.num_train, "val_images": folders.num_val,
                     "epochs": plan.tune_epochs, **flops, **side_summary(samples)}
            work = folders.num_train * flops["train_flops"] + folders.num_val * flops["forward_flops"]
            for side in ("plain", "finetune"):
                seconds = entry[f"{side}_s"]
                entry[f"{side}_images_per_s"] = ratio(folders.num_train, seconds)
                entry[f"{side}_gflops"] = work / seconds / 1e9 if seconds else None
                entry[f"{side}_share_of_peak"] = ratio(entry[f"{side}_gflops"], peak_gflops)
            entry["ratio"] = ratio(entry["finetune_images_per_s"], entry["plain_images_per_s"])
            entry["ratio_kind"] = "finetune/plain"
            threshold = 1.3 if length == "short" else 1.0
            entry["target"] = f"ratio >= {threshold}"
            entry["target_met"] = target_check(entry["ratio"], threshold)
            entries.append(entry)
    return entries


def row_extraction(bench: Bench) -> list[dict]:
    plan, entries = bench.plan, []
    for name, px in plan.frozen_backbones:
        folders = bench.data(px, plan.per_class)
        samples = bench.both_sides(f"row 4 {name} {px}px extraction",
                                   plain=lambda rep: plain_extract(folders, name, px, plan),
                                   finetune=lambda rep: bench.finetune_extract(folders, name, px))
        images = folders.num_train + folders.num_val
        entry = {"case": f"{name} {px}px, {images} images", "backbone": name, "px": px, "images": images,
                 **side_summary(samples)}
        for side in ("plain", "finetune"):
            counted = {r["images"] for r in samples[side]}
            if counted != {images}:
                raise RuntimeError(f"row 4: the {side} side saw {counted} images, expected {images}")
            entry[f"{side}_images_per_s"] = ratio(images, entry[f"{side}_s"])
        entry["ratio"] = ratio(entry["finetune_images_per_s"], entry["plain_images_per_s"])
        entry["ratio_kind"] = "finetune/plain"
        entry["target"] = "ratio >= 0.95"
        entry["target_met"] = target_check(entry["ratio"], 0.95)
        entries.append(entry)
    return entries


def row_memory(rows: dict) -> list[dict]:
    entries = []
    for number in sorted(r for r in rows if r not in (5, 6)):
        for source in rows[number]:
            plain, finetune = source["plain_peak_rss_mb"], source["finetune_peak_rss_mb"]
            entries.append({"case": f"row {number}: {source['case']}", "plain_s": source["plain_s"],
                            "finetune_s": source["finetune_s"], "plain_peak_rss_mb": plain,
                            "finetune_peak_rss_mb": finetune, "ratio": finetune / plain if plain >= 1 else None,
                            "ratio_kind": "finetune/plain", "target": None, "target_met": None})
    return entries


# ------------------------------------------------------------------------------ row 6: epoch stall
def step_clock():
    """A Keras callback that records perf_counter() at every batch end (per epoch) and epoch end."""
    import keras

    class StepClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.batches, self.ends = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.batches.append([])

        def on_train_batch_end(self, batch, logs=None):
            self.batches[-1].append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())

    return StepClock()


def stall_numbers(clock, steps: int, batch_size: int) -> dict:
    """Step s, epoch s and their efficiency from a StepClock, the first epoch left out."""
    gaps = [b - a for epoch in clock.batches[1:] for a, b in zip(epoch, epoch[1:])]
    step_s = median(gaps) if gaps else None
    epochs = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    epoch_s = sum(epochs) / len(epochs) if epochs else None  # the mean: a stall in some epochs counts
    return {"seconds": epoch_s, "step_s": step_s, "steps": steps,
            "epoch_s_all": [round(b - a, 3) for a, b in zip(clock.ends, clock.ends[1:])],
            "efficiency": steps * step_s / epoch_s if step_s and epoch_s else None,
            "step_images_per_s": batch_size / step_s if step_s else None}


def pipeline_images_per_s(ds, batches: int) -> float:
    """Images/s of iterating `ds` (batches of (images, labels)) with no model, after one untimed pass
    over `batches` batches (fills a cache, starts the prefetch threads)."""
    iterator = iter(ds)
    for _ in range(batches):
        next(iterator)
    images, start = 0, time.perf_counter()
    for _ in range(batches * 2):
        images += int(next(iterator)[0].shape[0])
    return images / (time.perf_counter() - start)


def plain_stall(folders: Folders, name: str, px: int, num_classes: int, plan: Plan) -> dict:
    import keras
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(folders.train, image_size=(px, px), batch_size=plan.batch_size,
                                                  shuffle=True, seed=0, verbose=False)
    ds = ds.cache().prefetch(tf.data.AUTOTUNE)
    model = plain_classifier(name, px, num_classes, "linear", 0)
    plain_compile(model, plan.frozen_lr)
    clock = step_clock()
    model.fit(ds, epochs=plan.stall_epochs, callbacks=[clock], verbose=0)
    steps = len(clock.batches[-1])
    result = stall_numbers(clock, steps, plan.batch_size)
    result["pipeline_images_per_s"] = pipeline_images_per_s(ds.repeat(), steps)
    return result


def finetune_stall(bench: "Bench", folders: Folders, name: str, px: int, num_classes: int) -> dict:
    from finetune.commands.train import prepare
    from finetune.model.assemble import assemble, build_parts
    from finetune.model.freeze import apply_freeze
    from finetune.train.inputs import image_inputs
    from finetune.train.optim import compile_model
    from finetune.train.stages import fit_stage

    plan = bench.plan
    overrides = [*bench.train_overrides(folders, name, px), "freeze=all", "head=linear",
                 f"optimizer.lr={plan.frozen_lr}"]
    cfg = compose("train", overrides)
    spec, dataset = prepare(cfg)
    parts = build_parts(cfg.backbone, cfg.head, spec, num_classes)
    inputs = image_inputs(cfg, dataset, parts.input_shape)
    apply_freeze(parts.backbone, parts.blocks, "all", 0, "frozen")
    model = assemble(parts, backbone_training=False)
    compile_model(model, cfg.optimizer, plan.frozen_lr, num_classes)
    clock = step_clock()
    fit_stage(model, inputs.train, None, first_epoch=0, epochs=plan.stall_epochs, callbacks=[clock],
              steps_per_epoch=inputs.steps_per_epoch, verbose=0)
    result = stall_numbers(clock, inputs.steps_per_epoch, plan.batch_size)
    result["pipeline_images_per_s"] = pipeline_images_per_s(inputs.train, inputs.steps_per_epoch)
    uncached = image_inputs(compose("train", [*overrides, "data.cache=off"]), dataset, parts.input_shape)
    result["pipeline_uncached_images_per_s"] = pipeline_images_per_s(uncached.train, inputs.steps_per_epoch)
    return result


def row_pipeline(bench: "Bench") -> list[dict]:
    plan = bench.plan
    name, px = plan.stall_backbone
    folders = bench.data(px, plan.stall_per_class)
    num_classes = len(plan.classes)
    samples = bench.both_sides(f"row 6 {name} {px}px epoch boundaries",
                               plain=lambda rep: plain_stall(folders, name, px, num_classes, plan),
                               finetune=lambda rep: finetune_stall(bench, folders, name, px, num_classes))
    entry = {"case": f"{name} {px}px frozen, {folders.num_train} images, batch {plan.batch_size}",
             "backbone": name, "px": px, "train_images": folders.num_train, "epochs": plan.stall_epochs,
             **side_summary(samples)}
    for side in ("plain", "finetune"):
        results = samples[side]
        for key in ("step_s", "efficiency", "step_images_per_s", "pipeline_images_per_s",
                    "pipeline_uncached_images_per_s"):
            values = [r[key] for r in results if r.get(key) is not None]
            entry[f"{side}_{key}"] = median(values) if values else None
        entry[f"{side}_epoch_s_all"] = [r["epoch_s_all"] for r in results]
        entry[f"{side}_pipeline_ratio"] = ratio(entry[f"{side}_pipeline_images_per_s"],
                                                entry[f"{side}_step_images_per_s"])
    entry["finetune_pipeline_uncached_ratio"] = ratio(entry["finetune_pipeline_uncached_images_per_s"],
                                                      entry["finetune_step_images_per_s"])
    entry["ratio"] = entry["finetune_efficiency"]
    entry["ratio_kind"] = "finetune efficiency (steps x step s / epoch s)"
    entry["target"] = "efficiency >= 0.95 and pipeline >= 3x the step rate"
    met = [target_check(entry["finetune_efficiency"], 0.95), target_check(entry["finetune_pipeline_ratio"], 3)]
    entry["target_met"] = None if None in met else all(met)
    return [entry]


# ------------------------------------------------------------------------------------------- report
def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def row_table(number: int, entries: list[dict]) -> list[str]:
    met = lambda e: fmt(e["target_met"]) if e["target_met"] is not None else "-"  # noqa: E731
    if number == 1:
        return table(["case", "plain s", "finetune s", "plain/finetune", "backbone pass s",
                      "finetune in backbone passes", "finetune after last epoch s", "feature cache", "target", "met"],
                     [[e["case"], fmt(e["plain_s"]), fmt(e["finetune_s"]), fmt(e["ratio"]),
                       fmt(e["backbone_pass_s"], 3),
                       fmt(e["finetune_backbone_passes"]), fmt(e["finetune_after_last_epoch_s"]),
                       e["finetune_feature_cache"], e["target"] or "-", met(e)] for e in entries])
    if number == 2:
        return table(["case", "plain s", "finetune s", "plain/finetune", "finetune s per trial (feature cache)",
                      "target", "met"],
                     [[e["case"], fmt(e["plain_s"]), fmt(e["finetune_s"]), fmt(e["ratio"]),
                       ", ".join(f"{s:.1f} ({c or '-'})" for s, c in zip(e["finetune_trial_s"],
                                                                        e["finetune_trial_feature_cache"])),
                       e["target"], met(e)] for e in entries])
    if number == 3:
        return table(["case", "plain epoch s", "finetune epoch s", "plain img/s", "finetune img/s", "finetune/plain",
                      "plain GFLOP/s (of peak)", "finetune GFLOP/s (of peak)", "target", "met"],
                     [[e["case"], fmt(e["plain_s"], 3), fmt(e["finetune_s"], 3), fmt(e["plain_images_per_s"], 1),
                       fmt(e["finetune_images_per_s"], 1), fmt(e["ratio"]),
                       f"{fmt(e['plain_gflops'], 1)} ({percent(e['plain_share_of_peak'])})",
                       f"{fmt(e['finetune_gflops'], 1)} ({percent(e['finetune_share_of_peak'])})",
                       e["target"], met(e)] for e in entries])
    if number == 6:
        return table(["side", "step s", "epoch s", "efficiency", "epoch s, each repetition",
                      "pipeline img/s (x step rate)", "pipeline, no cache, img/s (x step rate)"],
                     [[f"{side}: {e['case']}", fmt(e[f"{side}_step_s"], 3), fmt(e[f"{side}_s"], 3),
                       fmt(e[f"{side}_efficiency"]), "; ".join(", ".join(f"{x:.2f}" for x in rep)
                                                           for rep in e[f"{side}_epoch_s_all"]),
                       f"{fmt(e[f'{side}_pipeline_images_per_s'], 0)} ({fmt(e[f'{side}_pipeline_ratio'], 1)}x)",
                       (f"{fmt(e['finetune_pipeline_uncached_images_per_s'], 0)} "
                        f"({fmt(e['finetune_pipeline_uncached_ratio'], 1)}x)") if side == "finetune" else "-"]
                      for e in entries for side in ("plain", "finetune")])
    if number == 4:
        return table(["case", "plain s", "finetune s", "plain img/s", "finetune img/s", "finetune/plain", "target",
                      "met"],
                     [[e["case"], fmt(e["plain_s"]), fmt(e["finetune_s"]), fmt(e["plain_images_per_s"], 1),
                       fmt(e["finetune_images_per_s"], 1), fmt(e["ratio"]), e["target"], met(e)] for e in entries])
    return table(["case", "plain peak RSS increase MiB", "finetune peak RSS increase MiB", "finetune/plain"],
                 [[e["case"], fmt(e["plain_peak_rss_mb"], 0), fmt(e["finetune_peak_rss_mb"], 0), fmt(e["ratio"])]
                  for e in entries])


def markdown(report: dict) -> str:
    m, peak, plan = report["machine"], report["fp32_peak"], report["plan"]
    lines = ["# finetune benchmarks: finetune vs the plain Keras transfer-learning loop", "",
             f"Generated by `python scripts/bench.py{' --smoke' if report['smoke'] else ''} --rows "
             f"{','.join(map(str, report['rows_run']))} --repeats {report['repeats']}` on {m['date']}"
             + (" (**smoke mode: tiny sizes, the numbers mean nothing**)" if report["smoke"] else "") + ".", "",
             "## Machine", "",
             f"- CPU: {m['cpu']}, {m['cores']} usable core(s) ({m['logical_cpus']} logical CPUs), no GPU used",
             f"- Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; {m['platform']}",
             f"- finetune commit {m['finetune_commit'] or 'unknown'} (plus any uncommitted changes); "
             "trainer.feature_cache option: "
             + ("yes" if m["finetune_feature_cache_option"] else "no (not yet in this tree)"),
             f"- measured fp32 throughput: matmul {peak['matmul_shape'][0]}x{peak['matmul_shape'][1]} "
             f"{peak['matmul_gflops']:.1f} GFLOP/s, conv2d 3x3 on {peak['conv2d_input']} "
             f"{peak['conv2d_gflops']:.1f} GFLOP/s; peak used for shares = {peak['peak_gflops']:.1f} GFLOP/s",
             f"- repetitions per number: {report['repeats']} (medians shown; every repetition in the JSON)",
             f"- wall time of the whole benchmark: {report['wall_s']:.0f} s", "",
             "## How each number is measured", "",
             "```", __doc__.split("What each number is", 1)[1].split("\n", 1)[1].rstrip(), "```", "",
             f"Sizes: classes {list(plan['classes'])}, batch size {plan['batch_size']}, validation fraction "
             f"{plan['val_fraction']}, frozen learning rate {plan['frozen_lr']:g}, fine-tuning learning rate "
             f"{plan['tune_lr']:g}.", ""]
    for number in report["rows_run"]:
        entries = report["rows"].get(str(number), [])
        lines += [f"## {number}. {ROW_TITLES[number]}", "", *row_table(number, entries), ""]
    missed = [f"row {n}: {e['case']}" for n, es in report["rows"].items() for e in es if e["target_met"] is False]
    lines += ["## Targets", "", f"Missed: {'; '.join(missed)}." if missed else "Every target checked was met.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def parse_rows(text: str) -> list[int]:
    try:
        rows = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected row numbers like 1,2,5; received {text!r}") from None
    if not rows or not set(rows) <= set(ALL_ROWS):
        raise argparse.ArgumentTypeError(f"expected row numbers among {ALL_ROWS}; received {text!r}")
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition (< 1 minute)")
    parser.add_argument("--rows", type=parse_rows, default=list(ALL_ROWS), help="rows to run, e.g. 1,4")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per number (3; smoke: 1)")
    parser.add_argument("--frozen-backbones", default=None,
                        help="rows 1 and 4 on these backbones only, e.g. mobilenet_v2 (default: all of the plan)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file; the JSON goes beside it (default docs/benchmarks.md; smoke: a temp file)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "finetune-bench-smoke.md" if args.smoke
                    else REPO / "docs" / "benchmarks.md")
    if args.smoke and args.out.resolve().is_relative_to((REPO / "docs").resolve()):
        parser.error("--smoke numbers mean nothing: write them elsewhere than docs/ (--out /tmp/bench.md)")
    return args


def run_rows(bench: Bench, rows: list[int], peak: dict) -> dict:
    results: dict[int, list[dict]] = {}
    if 1 in rows:
        results[1] = row_frozen(bench)
    if 2 in rows:
        results[2] = row_head_sweep(bench)
    if 3 in rows:
        results[3] = row_fine_tuning(bench, peak["peak_gflops"])
    if 4 in rows:
        results[4] = row_extraction(bench)
    if 6 in rows:
        results[6] = row_pipeline(bench)
    if 5 in rows:
        results[5] = row_memory(results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.frozen_backbones:
        wanted = set(args.frozen_backbones.split(","))
        plan = dataclasses.replace(plan, frozen_backbones=tuple(b for b in plan.frozen_backbones if b[0] in wanted))
        if not plan.frozen_backbones:
            raise SystemExit(f"--frozen-backbones: none of {sorted(wanted)} is in the plan")
    started = time.perf_counter()
    machine = machine_info()  # now: the commit whose code this process imports and measures
    progress(f"{'smoke' if args.smoke else 'full'} benchmark, rows {args.rows}, {args.repeats} repetition(s)")
    from finetune.config.schema import register_configs

    register_configs()
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        bench = Bench(plan, Path(tmp), args.repeats)
        progress("warm-up (untimed)")
        warm_up(bench)
        progress("measuring this machine's fp32 matmul/conv2d throughput")
        peak = measure_fp32_peak(plan)
        results = run_rows(bench, args.rows, peak)
    report = {"smoke": args.smoke, "rows_run": args.rows, "repeats": args.repeats, "machine": machine,
              "fp32_peak": peak, "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items()},
              "process_max_rss_mb": max_rss_mb(), "wall_s": time.perf_counter() - started,
              "rows": {str(n): entries for n, entries in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.write_text(markdown(report))
    print(markdown(report))
    progress(f"wrote {args.out} and {args.out.with_suffix('.json')} in {report['wall_s']:.0f} s")
    return 0


def max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
