"""Training speed on one device against MirroredStrategy over every device present (GPUs, or logical CPU
devices from FINETUNE_LOGICAL_CPUS), the per-replica batch held fixed (the global batch grows with the
replicas, as one scales out in practice).

    python scripts/bench_strategy.py [--backbones resnet50,mobilenet_v2] [--size 224] [--batch 32]
                                     [--steps 10] [--out docs/strategy_<device>.json]

Each backbone (random weights), whole network trainable, one cached batch of random images: 2 warm-up
steps (tracing) and --steps timed steps of one fit. Reports images/s and the scaling over one device.
Run by scripts/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def images_per_s(name: str, strategy, size: int, batch: int, steps: int) -> float:
    import keras
    import numpy as np
    import tensorflow as tf

    from finetune.model.backbones import BACKBONES, build_backbone

    keras.backend.clear_session()
    global_batch = batch * strategy.num_replicas_in_sync
    with strategy.scope():
        backbone = build_backbone(BACKBONES[name], weights=None, input_shape=(size, size, 3), include_top=False,
                                  pooling="avg")
        inputs = keras.Input((size, size, 3))
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(backbone(inputs)))
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (global_batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, (global_batch,)).astype("int32")
    data = tf.data.Dataset.from_tensors((x, y)).cache().repeat()
    stamps = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: stamps.append(time.perf_counter()))
    model.fit(data, steps_per_epoch=2 + steps, epochs=1, verbose=0, callbacks=[clock])
    return global_batch * steps / (stamps[-1] - stamps[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="per replica")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from finetune.app.tf_logs import quiet_tensorflow

    quiet_tensorflow()  # also splits the CPU when FINETUNE_LOGICAL_CPUS is set
    import tensorflow as tf

    from finetune.train import distribute

    strategies = {"none": distribute.choose("none"), "mirrored": distribute.choose("mirrored")}
    rows = []
    for name in args.backbones.split(","):
        base = None
        for kind, distribution in strategies.items():
            rate = images_per_s(name, distribution.strategy, args.size, args.batch, args.steps)
            base = base or rate
            rows.append({"backbone": name, "strategy": kind, "replicas": distribution.replicas,
                         "global_batch": args.batch * distribution.replicas, "images_per_s": round(rate, 2),
                         "scaling_vs_one_device": round(rate / base, 3)})
            print(f"{name:<14} {kind:<9} {distribution.replicas} replica(s) {rate:9.1f} images/s  x{rate / base:.2f}",
                  file=sys.stderr, flush=True)
    result = {"devices": strategies["mirrored"].reason, "tf": tf.__version__, "size": args.size,
              "batch_per_replica": args.batch, "steps": args.steps, "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
