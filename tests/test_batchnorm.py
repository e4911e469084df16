"""BatchNorm statistics of trained BatchNorm layers must fit the data for inference-mode evaluation."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from finetune.model import batchnorm
def test_momentum_for_short_runs_is_lower_than_keras_default():
    assert batchnorm.momentum_for(29) < 0.91
    assert batchnorm.momentum_for(10_000) == 0.99
    assert batchnorm.momentum_for(1) == 0.5


def test_recalibration_sets_the_exact_population_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (64, 4, 4, 2)).astype("float32")
    inputs = keras.Input((4, 4, 2))
    conv = keras.layers.Conv2D(3, 1, name="conv")
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(conv(inputs)))
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(16)
    used = batchnorm.recalibrate(model, ds, [bn], max_batches=100)
    assert used == 4
    features = conv(x).numpy().reshape(-1, 3)
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(axis=0), rtol=1e-4, atol=1e-5)
    batch_vars = np.mean([conv(x[i:i + 16]).numpy().reshape(-1, 3).var(axis=0) for i in range(0, 64, 16)], 0)
    np.testing.assert_allclose(bn.moving_variance.numpy(), batch_vars, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.99  # restored


def small_cnn(classes=10):
    inputs = keras.Input((16, 16, 1))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def test_remedy_fixes_the_short_run_collapse_seen_on_digits():
    """The issue's case: a small CNN on 900 digits for a few epochs with Keras' momentum 0.99 has
    inference-mode validation accuracy far below its training accuracy; re-estimation fixes it."""
    digits = load_digits()
    images = tf.image.resize(digits.images[..., None].astype("float32") / 16.0, (16, 16)).numpy()
    labels = digits.target
    x_train, y_train, x_val, y_val = images[:900], labels[:900], images[900:], labels[900:]
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=4, verbose=0)
    train_acc = model.evaluate(x_train, y_train, verbose=0)[1]
    before = model.evaluate(x_val, y_val, verbose=0)[1]
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(32)
    batchnorm.recalibrate(model, ds, layers, max_batches=100)
    after = model.evaluate(x_val, y_val, verbose=0)[1]
    print(f"inference-mode accuracy: train {train_acc:.3f}; val before {before:.3f}, after {after:.3f}")
    assert after > 0.85
    assert after > before + 0.2
