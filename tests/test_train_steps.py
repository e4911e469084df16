"""The training core's registries and small steps, in process (no CLI): what a user's choice builds."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from finetune.config.schema import HeadConfig, OptimizerConfig
from finetune.errors import ConfigError
from finetune.model.heads import HEADS, build_head
from finetune.train.optim import OPTIMIZERS, make_optimizer


def optimizer_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(OptimizerConfig), values)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weight_decay_is_applied_by_every_optimizer(name):
    optimizer = make_optimizer(optimizer_cfg(name=name, weight_decay=0.01), 1e-3)
    assert optimizer.weight_decay == pytest.approx(0.01)
    assert make_optimizer(optimizer_cfg(name=name, weight_decay=0.0), 1e-3).weight_decay in (None, 0.0)


def test_sgd_keeps_its_momentum_and_clipnorm():
    optimizer = make_optimizer(optimizer_cfg(name="sgd", momentum=0.8, nesterov=True, clipnorm=2.0), 0.1)
    assert (optimizer.momentum, optimizer.nesterov, optimizer.clipnorm) == (0.8, True, 2.0)


def test_an_unknown_name_is_one_error_listing_the_options():
    cfg = OmegaConf.create({"name": "adamax", "weight_decay": 0.0, "clipnorm": None})
    with pytest.raises(ConfigError, match=r"optimizer: received 'adamax'; expected one of adam, adamw, sgd"):
        make_optimizer(cfg, 1e-3)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_ends_in_the_classifier(name):
    cfg = OmegaConf.merge(OmegaConf.structured(HeadConfig), {"name": name, "units": [8], "dropout": 0.1})
    layers = build_head(cfg, 3)
    assert layers[-1].name == "classifier" and layers[-1].units == 3
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == {"linear": ["Dropout", "Dense"], "mlp": ["Dense", "Dropout", "Dense"],
                     "flatten_mlp": ["Flatten", "Dense", "Dropout", "Dense"]}[name]


def test_a_fit_builds_the_optimizer_eagerly_and_gives_the_graph_optimizer_back():
    """fit_stage creates the optimizer's slots before tracing (the same variables Keras would make), and a
    head on cached features trains with Grappler off, which is on again afterwards."""
    import keras
    import numpy as np
    import tensorflow as tf

    from finetune.train.stages import fit_stage

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", name="d")], name="m")
    model.compile(keras.optimizers.Adam(1e-2, name="adam"), "sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).random((16, 4), np.float32), np.arange(16) % 3
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    seen = []

    class Options(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False))

    history = fit_stage(model, ds, ds, first_epoch=0, epochs=2, callbacks=[Options()], steps_per_epoch=None,
                        verbose=0, small_graph=True)
    assert seen == [True, True] and not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer")
    assert len(history.history["loss"]) == 2 and int(model.optimizer.iterations.numpy()) == 4
    assert sorted(v.path for v in model.optimizer.variables) == [
        "adam/iteration", "adam/learning_rate", "adam/m_d_bias_momentum", "adam/m_d_bias_velocity",
        "adam/m_d_kernel_momentum", "adam/m_d_kernel_velocity"]
