"""The fine-tuning recipe, technique by technique: each test checks what the technique claims.

Schedules (their formulas, the rate Keras trains with and logs, resume), class weights, the balanced
sampler, label smoothing and focal loss. In-process, tiny models; the end-to-end run through the CLI is in
tests/test_recipe_cli.py."""
from __future__ import annotations

import math
from types import SimpleNamespace as NS

import numpy as np
import pytest

from finetune.config.schema import ScheduleConfig
from finetune.errors import ConfigError
from finetune.train import imbalance, schedules
from finetune.train.schedules import StagePlan, rate


def schedule_cfg(name, **kw):
    return ScheduleConfig(name=name, **kw)


PLAN = StagePlan(lr=0.01, epochs=5, updates_per_epoch=4)  # 20 updates


def test_warmup_is_linear_then_each_schedule_follows_its_formula():
    lr, T = PLAN.lr, PLAN.total
    cos = schedule_cfg("cosine", warmup_epochs=1, min_lr_ratio=0.1)
    assert [rate(cos, PLAN, s) for s in range(4)] == pytest.approx([lr * (s + 1) / 4 for s in range(4)])
    for s in range(4, T):
        p = (s - 4) / (T - 4)
        assert rate(cos, PLAN, s) == pytest.approx(lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    step = schedule_cfg("step", every_epochs=2, gamma=0.5)
    assert [rate(step, PLAN, s) for s in (0, 7, 8, 15, 16, 19)] == pytest.approx(
        [lr, lr, lr / 2, lr / 2, lr / 4, lr / 4])
    constant = schedule_cfg("constant", warmup_epochs=0.5)  # half an epoch: 2 updates
    assert [rate(constant, PLAN, s) for s in range(4)] == pytest.approx([lr / 2, lr, lr, lr])
    plateau = schedule_cfg("plateau", warmup_epochs=1)
    assert rate(plateau, PLAN, 10, scale=0.25) == pytest.approx(lr * 0.25)
    assert rate(plateau, PLAN, 1, scale=0.25) == pytest.approx(lr * 2 / 4)  # warmup first


def test_one_cycle_rises_from_lr_over_div_factor_to_lr_then_anneals_to_its_floor():
    cfg = schedule_cfg("one_cycle", pct_start=0.25, div_factor=25.0, min_lr_ratio=1e-3, warmup_epochs=3)
    rates = [rate(cfg, PLAN, s) for s in range(PLAN.total)]
    assert rates[0] == pytest.approx(PLAN.lr / 25)  # its own rise, warmup_epochs does not apply
    assert max(rates) == pytest.approx(PLAN.lr) and int(np.argmax(rates)) == 5  # 25% of 20 updates
    assert all(a <= b for a, b in zip(rates[:6], rates[1:6])) and all(a >= b for a, b in zip(rates[5:], rates[6:]))
    assert rates[-1] == pytest.approx(PLAN.lr * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 14 / 15))))


def _fit(callback, epochs, initial_epoch=0, seed=0):
    """A tiny model fitted with `callback`; returns the learning rate it holds at each epoch end."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    seen = {}

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
              callbacks=[callback, Watch()], shuffle=False)
    return seen


def test_the_rate_keras_trains_with_is_the_formula_and_a_resumed_stage_continues_it():
    """4 batches an epoch; the stage started at run epoch 2 (a second stage). The rate an epoch ends with is
    the rate of its last update, the value `learning_rate` logs; a stage resumed at its 3rd epoch
    continues the same curve."""
    cfg = schedule_cfg("cosine", warmup_epochs=1, min_lr_ratio=0.0)
    plan = StagePlan(lr=0.01, epochs=4, updates_per_epoch=4)
    whole = schedules.ScheduleCallback(cfg, plan, first_epoch=2, batches_per_epoch=4)
    seen = _fit(whole, epochs=6, initial_epoch=2)
    assert [s for s, _ in whole.steps] == list(range(16))
    for epoch, value in seen.items():
        assert value == pytest.approx(rate(cfg, plan, (epoch - 2 + 1) * 4 - 1), rel=1e-6), epoch
    resumed = schedules.ScheduleCallback(cfg, plan, first_epoch=2, batches_per_epoch=4, state=whole.state())
    again = _fit(resumed, epochs=6, initial_epoch=4)
    assert again == pytest.approx({4: seen[4], 5: seen[5]})
    assert [s for s, _ in resumed.steps] == list(range(8, 16))


def test_updates_count_optimizer_steps_under_gradient_accumulation():
    cfg = schedule_cfg("cosine")
    plan = StagePlan(lr=1.0, epochs=2, updates_per_epoch=2)  # 4 batches an epoch, 2 per update
    callback = schedules.ScheduleCallback(cfg, plan, first_epoch=0, batches_per_epoch=4, accumulate=2)
    assert [callback.update_index(e, b) for e in (0, 1) for b in range(4)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_plateau_reduces_after_patience_never_below_its_floor_and_its_state_resumes():
    cfg = schedule_cfg("plateau", warmup_epochs=1, factor=0.5, patience=2, min_lr_ratio=0.2)
    plan = StagePlan(lr=1.0, epochs=10, updates_per_epoch=4)
    callback = schedules.ScheduleCallback(cfg, plan, first_epoch=0, batches_per_epoch=4)
    losses = [9.0, 1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9]
    scales = []
    for epoch, loss in enumerate(losses):
        callback.on_epoch_end(epoch, {"val_loss": loss})
        scales.append(callback.scale)
    # epoch 0 is warmup (not compared); best 1.0 at 1; 2 worse epochs -> x0.5; better at 4; 2 worse -> x0.25
    # -> floor 0.2 after 2 more
    assert scales == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2]
    restored = schedules.ScheduleCallback(cfg, plan, first_epoch=0, batches_per_epoch=4, state=callback.state())
    assert (restored.scale, restored.best, restored.wait) == (0.2, 0.5, 0)


def test_balanced_class_weights_are_n_over_k_times_n_c():
    counts = imbalance.label_counts([0] * 30 + [1] * 6 + [2] * 4, 3)
    weights = imbalance.class_weights("balanced", ["a", "b", "c"], counts)
    assert weights == pytest.approx({0: 40 / (3 * 30), 1: 40 / (3 * 6), 2: 40 / (3 * 4)})
    assert imbalance.class_weights("none", ["a", "b", "c"], counts) is None
    assert imbalance.class_weights({"c": 5.0}, ["a", "b", "c"], counts) == {0: 1.0, 1: 1.0, 2: 5.0}
    with pytest.raises(ConfigError) as info:
        imbalance.class_weights({"dog": 2.0}, ["a", "b", "c"], counts)
    assert info.value.key == "trainer.class_weight.dog" and "a, b, c" in str(info.value)
    assert imbalance.minority_classes(counts) == [1, 2]


def test_label_smoothing_and_focal_take_integer_labels():
    import keras

    from finetune.train.optim import make_loss

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], "float32")
    labels = np.array([0, 2])
    smoothed = make_loss(NS(name="crossentropy", label_smoothing=0.3, gamma=2.0, alpha=0.25), 3)
    target = np.eye(3)[labels] * 0.7 + 0.1  # 1 - s on the class, s / k on each
    expected = -np.mean(np.sum(target * np.log(probs), axis=1))
    assert float(smoothed(labels, probs)) == pytest.approx(expected, rel=1e-5)
    focal = make_loss(NS(name="focal", label_smoothing=0.0, gamma=2.0, alpha=0.25), 3)
    p_true = probs[[0, 1], labels]
    assert float(focal(labels, probs)) == pytest.approx(
        np.mean(np.sum(-0.25 * (1 - probs) ** 2 * np.eye(3)[labels] * np.log(probs), axis=1)), rel=1e-5)
    assert float(focal(labels, probs)) < float(keras.losses.SparseCategoricalCrossentropy()(labels, probs))
    assert p_true.min() > 0  # (the expected values above are finite)
    plain = make_loss(NS(name="crossentropy", label_smoothing=0.0, gamma=2.0, alpha=0.25), 3)
    assert float(plain(labels, probs)) == pytest.approx(-np.mean(np.log(p_true)), rel=1e-5)


@pytest.mark.parametrize("form", ["arrays", "files"])
def test_the_balanced_sampler_draws_every_class_equally(tmp_path, form):
    """10:2:1 imbalance; 3,000 drawn training images come out ~1/3 each (in memory, and files decoded as
    they are drawn)."""
    from PIL import Image

    from finetune.data import make_pipeline
    from finetune.data.dataset import Dataset, Split

    labels = np.array([0] * 40 + [1] * 8 + [2] * 4, np.int32)
    images = np.random.default_rng(0).integers(0, 255, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    if form == "arrays":
        train = Split(images=images, labels=labels, size=len(labels))
    else:
        paths = []
        for i, image in enumerate(images):
            paths.append(str(tmp_path / f"{i}.png"))
            Image.fromarray(image).save(paths[-1])
        train = Split(paths=paths, labels=labels, size=len(labels))
    dataset = Dataset("imbalanced", ["a", "b", "c"], train, Split(images=images[:3], labels=labels[:3], size=3),
                      None, None)
    ds = make_pipeline(dataset, "train", 8, 30, training=True, seed=0, sampler="balanced",
                       cache="memory" if form == "arrays" else "off")
    drawn = np.concatenate([y.numpy() for _, y in ds.take(100)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert len(drawn) == 3000 and np.all(np.abs(shares - 1 / 3) < 0.04), shares


@pytest.mark.parametrize("overrides,key", [
    (["schedule=cosine", "schedule.min_lr_ratio=2"], "schedule.min_lr_ratio"),
    (["schedule.warmup_epochs=-1"], "schedule.warmup_epochs"),
    (["schedule=plateau", "schedule.monitor=loss"], "schedule.monitor"),
    (["schedule=one_cycle", "schedule.pct_start=1.5"], "schedule.pct_start"),
    (["loss.label_smoothing=1"], "loss.label_smoothing"),
    (["trainer.class_weight=often"], "trainer.class_weight"),
    (["trainer.class_weight={a: 0}"], "trainer.class_weight.a"),
    (["trainer.class_weight=balanced", "data.sampler=balanced"], "trainer.class_weight"),
    (["augment=flip", "augment.mixup=0.2", "trainer.feature_cache_views=2"], "trainer.feature_cache_views"),
    (["freeze=gradual", "freeze.max_blocks=0"], "freeze.max_blocks"),
    (["optimizer.lr=fast"], "optimizer.lr"),
])
def test_recipe_values_are_checked_before_training(overrides, key):
    from finetune.app.checks import validate_train
    from tests.test_config import compose

    with pytest.raises(ConfigError) as info:
        validate_train(compose(*overrides))
    assert info.value.key == key and "\n" not in str(info.value)


def _policy(name, **kw):
    from omegaconf import OmegaConf

    from finetune.config.schema import AugmentConfig

    return OmegaConf.structured(AugmentConfig(name=name, **kw))


def _image_batches(policy, batches=2, size=16):
    import tensorflow as tf

    from finetune.data.augment import augment_batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(batches * 8, size, size, 3)).astype("float32")
    labels = np.arange(batches * 8, dtype="int32") % 3
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    return images, labels, [(x.numpy(), y.numpy()) for x, y in augment_batches(ds, policy, seed=0, num_classes=3)]


@pytest.mark.parametrize("name", ["light", "strong"])
def test_light_and_strong_change_the_images_and_keep_shape_range_and_labels(name):
    images, labels, out = _image_batches(_policy(name))
    x = np.concatenate([b[0] for b in out])
    assert x.shape == images.shape and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255.0 + 1e-3
    assert np.mean(np.abs(x - images)) > 5  # most images changed
    assert np.array_equal(np.concatenate([b[1] for b in out]), labels)  # integer labels, untouched


def test_random_resized_crop_keeps_a_part_of_the_image_at_full_size():
    import tensorflow as tf

    from finetune.data.augment import random_resized_crop

    image = np.zeros((1, 40, 40, 3), "float32")
    image[0, :, 20:] = 255.0  # right half white
    crops = np.concatenate([random_resized_crop((0.1, 0.2), seed=s)(tf.constant(image)).numpy() for s in range(20)])
    assert crops.shape == (20, 40, 40, 3)
    means = crops.mean(axis=(1, 2, 3))
    assert (means < 10).any() and (means > 245).any()  # small crops fall in one half or the other


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mixup_and_cutmix_make_one_hot_labels_that_sum_to_one_and_mix(mix):
    _, labels, out = _image_batches(_policy("flip", **mix), batches=4)
    y = np.concatenate([b[1] for b in out])
    assert y.shape == (len(labels), 3)
    assert np.allclose(y.sum(axis=1), 1.0, atol=1e-5) and (y >= -1e-6).all()
    assert (y.max(axis=1) < 1 - 1e-3).any()  # some labels are mixtures


def test_the_old_data_augment_key_names_the_new_group():
    from finetune.app.hydra_app import precheck

    message = precheck("train", ["data.augment=flip"])
    assert message == "data.augment: moved to the augment group: augment=flip (or none, light, strong)"


def _tiny_fit(optimizer_options, callbacks=(), batches=4, epochs=2):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, **optimizer_options), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8 * batches, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=list(callbacks))
    return model


def test_the_weights_after_training_with_ema_are_the_moving_average():
    """The weights the run saves are the EMA the optimizer kept, not the last step's weights, and the
    validation swap puts the raw weights back after each evaluation."""
    import keras

    from finetune.train.optim import common_options

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.raw = [w.numpy().copy() for w in self.model.trainable_weights]
            self.average = [v.numpy().copy() for v in self.model.optimizer._model_variables_moving_average]

    keep = Keep()
    options = common_options(NS(ema=True, ema_momentum=0.9, weight_decay=0, clipnorm=None))
    model = _tiny_fit(options, [keep])
    final = [w.numpy() for w in model.trainable_weights]
    assert all(np.allclose(f, a) for f, a in zip(final, keep.average))
    assert not all(np.allclose(f, r) for f, r in zip(final, keep.raw))


def test_gradient_accumulation_updates_once_every_n_batches():
    import keras

    from finetune.train.optim import common_options

    class Track(keras.callbacks.Callback):
        changes = []

        def on_train_batch_begin(self, batch, logs=None):
            self.before = self.model.trainable_weights[0].numpy().copy()

        def on_train_batch_end(self, batch, logs=None):
            self.changes.append(not np.allclose(self.before, self.model.trainable_weights[0].numpy()))

    options = common_options(NS(ema=False, weight_decay=0, clipnorm=None), accumulate=2)
    model = _tiny_fit(options, [Track()], batches=4, epochs=1)
    assert Track.changes == [False, True, False, True]
    assert int(model.optimizer.iterations) == 2  # updates, what the schedule counts


@pytest.mark.parametrize("mode,views", [("none", 1), ("flip", 2), ("flip_crops", 6)])
def test_tta_probabilities_are_the_mean_over_the_views(tmp_path, mode, views):
    import keras
    import tensorflow as tf
    from PIL import Image

    from finetune.commands.predict import predict_files
    from finetune.model import tta

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    images = np.random.default_rng(0).integers(0, 255, size=(5, 16, 16, 3)).astype("float32")
    made = tta.VIEWS[mode](tf.constant(images))
    assert len(made) == views
    if views > 1:
        assert np.array_equal(made[1].numpy(), images[:, :, ::-1])
    if views == 6:  # corner crops of 87.5% of each side: on a left-to-right ramp, left ones span 0..87.5%
        ramp = np.broadcast_to(np.arange(16, dtype="float32")[None, None, :, None] * 10, (1, 16, 16, 3))
        top_left, top_right = (v.numpy()[0, 0, :, 0] for v in tta.VIEWS[mode](tf.constant(ramp))[2:4])
        assert top_left[0] == pytest.approx(0) and top_left[-1] == pytest.approx(0.875 * 150)
        assert top_right[0] == pytest.approx(0.125 * 150) and top_right[-1] == pytest.approx(150)
    expected = np.mean([model.predict_on_batch(v) for v in made], axis=0)
    assert np.allclose(tta.predict(model, tf.constant(images), mode), expected, atol=1e-6)
    paths = []
    for i, image in enumerate(images.astype(np.uint8)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    assert np.allclose(predict_files(model, paths, (16, 16), 2, tta=mode), expected, atol=1e-5)


def test_the_range_test_rises_exponentially_suggests_a_rate_and_restores_the_model():
    import keras
    import tensorflow as tf

    from finetune.train import lr_finder

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = np.argmax(x[:, :3], axis=1).astype("int32")
    model.fit(x[:32], y[:32], epochs=1, verbose=0)  # optimizer state exists and must come back too
    before = [w.numpy().copy() for w in model.weights]
    optimizer_before = [v.numpy().copy() for v in model.optimizer.variables]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=0).batch(16).repeat()
    result = lr_finder.range_test(model, ds, steps=60, start=1e-5, end=10.0)
    assert result.rates[0] == pytest.approx(1e-5)
    ratios = np.diff(np.log(result.rates))
    assert np.allclose(ratios, np.log(1e6) / 59)  # exponential steps
    assert len(result.rates) < 60  # stopped when the loss diverged at the high rates
    assert 1e-4 < result.suggestion < 1.0
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(optimizer_before, model.optimizer.variables))


def test_gradual_phases_unfreeze_one_weighted_block_every_e_epochs_and_share_the_schedule():
    from finetune.train.stages import Stage, gradual_phases

    stage = Stage("train", 7, "gradual", 2, 0.01)
    phases = gradual_phases(stage, every=2, steps=[2, 3, 4])  # e.g. VGG16: top (pooling) has no weights
    assert [(p.name, p.epochs, p.policy, p.n) for p in phases] == [
        ("train_top0", 2, "all", 0), ("train_top1", 2, "last_n", 2), ("train_top2", 2, "last_n", 3),
        ("train_top3", 1, "last_n", 4)]
    assert [p.schedule_offset for p in phases] == [0, 2, 4, 6] and {p.schedule_epochs for p in phases} == {7}
    capped = gradual_phases(stage, every=2, steps=[2])  # freeze.max_blocks=1: the last phase runs on
    assert [(p.epochs, p.n) for p in capped] == [(2, 0), (5, 2)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_each_blocks_update_is_scaled_by_gamma_to_the_i(optimizer):
    """Three 'blocks' of equal layers below a head: with layer_decay 0.5 their first updates are 0.5, 0.25
    and 0.125 of the head's own rate (SGD: lr x m x gradient; Adam's first step: lr x m x sign)."""
    import keras

    from finetune.train import layer_lr
    from finetune.train.optim import make_optimizer

    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(4, name=f"d{i}") for i in range(3)]
    head = keras.layers.Dense(2, activation="softmax", name="head")
    model = keras.Sequential([keras.Input((4,)), *layers, head])
    blocks = [("stem", []), ("b1", [layers[0]]), ("b2", [layers[1]]), ("b3", [layers[2]]), ("top", [])]
    multipliers = layer_lr.block_multipliers(blocks, 0.5, {})
    assert multipliers == {"b3": 0.5, "b2": 0.25, "b1": 0.125}
    assert layer_lr.block_multipliers(blocks, 0.5, {"b1": 2.0})["b1"] == 2.0
    cfg = NS(name=optimizer, weight_decay=0.0, clipnorm=None, momentum=0.0, nesterov=False, ema=False)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.arange(16) % 2
    before = {layer.name: layer.kernel.numpy().copy() for layer in [*layers, head]}
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x)))
    grads = dict(zip([w.path for w in model.trainable_weights], tape.gradient(loss, model.trainable_weights)))
    opt = layer_lr.with_lr_multipliers(make_optimizer(cfg, 0.01), layer_lr.variable_multipliers(blocks, multipliers))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    for layer, m in zip([*layers, head], [0.125, 0.25, 0.5, 1.0]):
        step = before[layer.name] - layer.kernel.numpy()
        g = grads[layer.kernel.path].numpy()
        # Keras Adam's first step: lr * sqrt(1 - b2) / (1 - b1) * (1 - b1) g / (sqrt(1 - b2) |g| + eps)
        expected = 0.01 * m * (g if optimizer == "sgd" else g / (np.abs(g) + 1e-7 / np.sqrt(1 - 0.999)))
        assert np.allclose(step, expected, rtol=2e-3, atol=1e-7), (layer.name, m)


def test_feature_views_draw_one_cached_view_per_image_each_epoch():
    """K = 3 views of 4 images (view v of image i holds 10 i + v): every drawn vector is one of its own
    image's views, and over epochs every view gets drawn."""
    from finetune.train.inputs import feature_inputs

    views = np.array([[[10.0 * i + v] for i in range(4)] for v in range(3)], "float32")  # [3, 4, 1]
    labels = np.arange(4, dtype="int32")
    inputs = feature_inputs({"train": (views, labels), "val": (views[0], labels)}, 4, seed=0, steps=1, views=3)
    seen = set()
    for x, y in inputs.train.take(30):
        for value, label in zip(x.numpy()[:, 0], y.numpy()):
            assert int(value) // 10 == label  # its own image
            seen.add(int(value))
    assert seen == {10 * i + v for i in range(4) for v in range(3)}
    plain = next(iter(inputs.train_plain))[0].numpy()[:, 0]
    assert list(plain) == [0, 10, 20, 30]  # view 0 stands for the split where it is read plainly


def test_batchnorm_recalibration_replaces_the_statistics_of_accumulated_micro_batches():
    """With accumulate_steps=4 on batches of 2, BatchNorm's moving statistics come from 2-image batches;
    the recalibration after the stage re-estimates them as the mean over the training batches of each
    batch's own statistics (the "precise BN" estimate), whatever the micro-batches left."""
    import keras
    import tensorflow as tf

    from finetune.model import batchnorm
    from finetune.train.optim import common_options

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3)(inputs)
    bn_layer = keras.layers.BatchNormalization(momentum=0.5)
    x = keras.layers.GlobalAveragePooling2D()(bn_layer(conv))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    options = common_options(NS(ema=False, weight_decay=0, clipnorm=None), accumulate=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2, **options), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = (rng.normal(size=(32, 6, 6, 3)) * 3 + 1).astype("float32")
    labels = (images.mean(axis=(1, 2, 3)) > 1).astype("int32")
    model.fit(images, labels, batch_size=2, epochs=2, verbose=0, shuffle=False)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    features = keras.Model(inputs, conv)
    per_batch = [features.predict_on_batch(images[i:i + 8]) for i in range(0, 32, 8)]
    expected_mean = np.mean([b.mean(axis=(0, 1, 2)) for b in per_batch], axis=0)
    expected_var = np.mean([b.var(axis=(0, 1, 2)) for b in per_batch], axis=0)
    assert not np.allclose(bn_layer.moving_variance.numpy(), expected_var, rtol=2e-2, atol=1e-3)  # micro-batches
    used = batchnorm.recalibrate(model, data, [bn_layer], max_batches=100)
    assert used == 4
    assert np.allclose(bn_layer.moving_mean.numpy(), expected_mean, atol=1e-4)
    assert np.allclose(bn_layer.moving_variance.numpy(), expected_var, rtol=2e-2, atol=1e-3)


def test_the_suggestion_is_the_sustained_descent_not_the_first_steps_noise():
    """What the transfer demo's frozen run recorded, in shape: batch-to-batch noise of +-0.1 over the first
    steps (flat on average, 50 images in batches of 10), the real descent between 1e-3 and 5e-2, then
    divergence. Point-to-point slopes picked the noise (4e-7); a decade-wide slope finds the descent."""
    from finetune.train.lr_finder import RangeTest, rate_at

    steps = 60
    rates = [rate_at(i, steps, 1e-7, 1.0) for i in range(steps)]
    rng = np.random.default_rng(0)
    smoothed = []
    for i, lr in enumerate(rates):
        noise = 0.12 * np.sin(i * 2.1) if i < 15 else 0.01 * rng.normal()
        descent = 0.45 * min(1.0, max(0.0, (np.log10(lr) + 3) / 1.7))  # 2.5 -> 2.05 from 1e-3 to 5e-2
        rise = 4.0 * max(0.0, np.log10(lr) + 1) ** 2
        smoothed.append(2.5 + noise - descent + rise)
    result = RangeTest(rates=rates, losses=smoothed, smoothed=smoothed)
    assert 1e-3 <= result.suggest() <= 5e-2


def test_no_descent_gives_the_default_rate_and_says_so():
    """A deep network from random weights on 50 images (the demo's scratch run): the loss wanders around
    its start at every rate, then diverges. No rate is better than another; the default is used."""
    from finetune.train import lr_finder

    rates = [lr_finder.rate_at(i, 60, 1e-7, 1.0) for i in range(60)]
    smoothed = [1.95 + 0.05 * np.sin(i) + (3.0 * (np.log10(r) + 2.2) if r > 6e-3 else 0.0) for i, r in enumerate(rates)]
    result = lr_finder.RangeTest(rates=rates, losses=smoothed, smoothed=smoothed)
    assert result.suggest() == lr_finder.FALLBACK_LR and result.fallback
    assert "no descent" in lr_finder.describe(result)
