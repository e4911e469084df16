"""Training speed of backbones under each precision policy, with and without XLA, on this device.

    python scripts/bench_precision.py [--backbones resnet50,mobilenet_v2,...] [--size 224] [--batch 32]
                                      [--steps 8] [--out docs/precision_<device>.json]

For each backbone (random weights: the speed is the same as ImageNet's), each policy (fp32,
mixed_bfloat16, and mixed_float16 on a GPU) and jit_compile off/on, trains the whole network (every
layer trainable, the costliest case) on one cached batch of random images for --steps timed steps
after 2 warm-up steps of the same fit (the first includes tracing/compilation) and reports images/s and the speed-up
over fp32 without XLA. The table behind `trainer.precision=auto` and `trainer.jit_compile=auto`
(finetune/compute.py) comes from these numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT = "resnet50,mobilenet_v2,efficientnet_b0,vgg16,densenet121,inception_v3,convnext_tiny,xception"


def step_rate(name: str, policy: str, jit: bool, size: int, batch: int, steps: int) -> float:
    import keras
    import numpy as np
    import tensorflow as tf

    from finetune.model.backbones import BACKBONES, build_backbone

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    spec = BACKBONES[name]
    backbone = build_backbone(spec, weights=None, input_shape=(size, size, 3), include_top=False, pooling="avg")
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(backbone(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, (batch,)).astype("int32")
    data = tf.data.Dataset.from_tensors((x, y)).cache().repeat()
    stamps = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: stamps.append(time.perf_counter()))
    # one fit, one iterator: the first 2 steps trace/compile and warm up, the rest are timed
    model.fit(data, steps_per_epoch=2 + steps, epochs=1, verbose=0, callbacks=[clock])
    seconds = stamps[-1] - stamps[1]
    keras.mixed_precision.set_global_policy("float32")
    return batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=DEFAULT)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-jit", action="store_true", help="skip jit_compile=True")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import tensorflow as tf

    from finetune.train.compute import device_class

    device = device_class()
    policies = ["float32", "mixed_bfloat16"] + (["mixed_float16"] if device == "gpu" else [])
    rows = []
    for name in args.backbones.split(","):
        base = None
        for policy in policies:
            for jit in (False,) if args.no_jit else (False, True):
                try:
                    rate = step_rate(name, policy, jit, args.size, args.batch, args.steps)
                except Exception as error:  # noqa: BLE001 - report and go on (e.g. an XLA op gap)
                    print(f"{name:<16} {policy:<15} jit={jit!s:<5} failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:120]}", file=sys.stderr, flush=True)
                    rows.append({"backbone": name, "policy": policy, "jit": jit, "images_per_s": None})
                    continue
                base = base or rate if (policy, jit) == ("float32", False) else base
                speedup = rate / base if base else None
                rows.append({"backbone": name, "policy": policy, "jit": jit, "images_per_s": round(rate, 2),
                             "speedup_vs_fp32": round(speedup, 3) if speedup else None})
                print(f"{name:<16} {policy:<15} jit={jit!s:<5} {rate:8.1f} images/s  x{speedup or 0:.2f}",
                      file=sys.stderr, flush=True)
    result = {"device": device, "machine": platform.processor() or platform.machine(),
              "gpus": [d.name for d in tf.config.list_physical_devices("GPU")], "tf": tf.__version__,
              "size": args.size, "batch": args.batch, "steps": args.steps, "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
