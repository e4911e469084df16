#!/usr/bin/env python
"""The plain hand-written Keras transfer-learning script that scripts/bench.py times as a whole process
(row 7): the other side of `finetune train` / `finetune train -m` on the same image folders.

    python scripts/plain_keras.py --train DIR --val DIR --px 128 --epochs 5 --trials linear:1e-3,mlp:3e-4

As the Keras transfer-learning guide writes it: the folders with image_dataset_from_directory
(.cache().prefetch()), then for each trial clear_session, MobileNetV2(include_top=False, pooling="avg",
weights=None: nothing can be downloaded here, same speed as ImageNet) frozen and called with
training=False, the head (linear: dropout 0.2 + softmax; mlp: dense 256 relu + dropout 0.2 + softmax),
Adam at the trial's learning rate, model.fit(train, validation_data=val). No feature caching.
Prints one JSON line: the trials' final val_accuracy.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_trials(text: str) -> list[tuple[str, float]]:
    return [(item.split(":")[0], float(item.split(":")[1])) for item in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", default="linear:1e-3", help="head:lr,head:lr,... (head: linear | mlp)")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    def folder(path, shuffle):
        ds = keras.utils.image_dataset_from_directory(path, image_size=(args.px, args.px), batch_size=args.batch_size,
                                                      shuffle=shuffle, seed=0, verbose=False)
        return ds.cache().prefetch(tf.data.AUTOTUNE)

    train, val = folder(args.train, True), folder(args.val, False)
    num_classes = len(os.listdir(args.train))
    results = []
    for head, lr in parse_trials(args.trials):
        keras.backend.clear_session()
        base = keras.applications.MobileNetV2(weights=None, input_shape=(args.px, args.px, 3), include_top=False,
                                              pooling="avg")
        base.trainable = False
        inputs = keras.Input(shape=(args.px, args.px, 3))
        x = keras.layers.Lambda(keras.applications.mobilenet_v2.preprocess_input)(inputs)
        x = base(x, training=False)
        if head == "mlp":
            x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.2)(x)
        model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        history = model.fit(train, validation_data=val, epochs=args.epochs, verbose=0)
        results.append({"head": head, "lr": lr, "val_accuracy": history.history["val_accuracy"][-1]})
    print(json.dumps({"trials": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
