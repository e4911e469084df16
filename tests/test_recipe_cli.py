"""The recipe through `finetune train` on an imbalanced folder (a 6:1:1 split of colours): the schedule's
rate is what MLflow logs each epoch, the class weights and the minority classes' recall are recorded, and
the balanced sampler, the plateau schedule, focal loss, EMA and gradient accumulation run on cached
features."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tests.conftest import artifact_paths, runs_of

pytestmark = pytest.mark.slow

COUNTS = {"red": 36, "green": 6, "blue": 6}
COMMON = ["backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "freeze=all",
          "data=folder", "data.val_split=0.25", "trainer.batch_size=8", "trainer.epochs=3", "trainer.verbose=0"]
# what these tests read is the run's parameters, metrics and plots: no model files (VGG16 ~60 MB each, 3 copies)
NO_MODEL = "tracking.log_model=false"


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    for channel, (name, count) in enumerate(COUNTS.items()):
        (root / name).mkdir()
        for i in range(count):
            image = rng.integers(0, 90, size=(32, 32, 3), dtype=np.uint8)
            image[..., channel] = rng.integers(150, 255, size=(32, 32), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def test_cosine_warmup_class_weights_and_smoothing_are_what_the_run_records(cli, mlflow_client, imbalanced):
    result = cli("train", *COMMON, f"data.path={imbalanced}", NO_MODEL, "schedule=cosine", "schedule.warmup_epochs=1",
                 "loss.label_smoothing=0.1", "trainer.class_weight=balanced", experiment="e2e_recipe")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_recipe")
    params, metrics = run.data.params, run.data.metrics
    train = {name: int(n * 0.75) for name, n in COUNTS.items()}  # 27, 4, 4 (val_split 0.25 per class)
    n, k = sum(train.values()), len(train)
    for name, count in train.items():
        assert float(params[f"class_weight.{name}"]) == pytest.approx(n / (k * count), rel=1e-5)
    assert params["schedule.name"] == "cosine" and params["loss.label_smoothing"] == "0.1"
    # 35 images / batch 8 = 5 updates an epoch, 15 in all, 5 of warmup: each epoch logs its last update's rate
    updates, total, warm, lr = 5, 15, 5, 1e-3
    expected = [lr * 5 / 5] + [lr * 0.5 * (1 + math.cos(math.pi * (e * updates - 1 - warm) / (total - warm)))
                               for e in (2, 3)]
    logged = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, "learning_rate"))
    assert [step for step, _ in logged] == [0, 1, 2]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-5)
    # ... and every update's rate is a curve of its own: warmup (s+1)/W, then the cosine
    per_update = sorted((m.step, m.value) for m in
                        mlflow_client.get_metric_history(run.info.run_id, "learning_rate_per_update"))
    formula = [lr * (s + 1) / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
               for s in range(total)]
    assert [step for step, _ in per_update] == list(range(total))
    assert [value for _, value in per_update] == pytest.approx(formula, rel=1e-5)
    assert "val_minority_recall" in {k.replace("final_", "") for k in metrics}
    line = next(line for line in result.stdout.splitlines() if "minority classes:" in line)
    assert "blue (4 training images) recall" in line and "green (4 training images) recall" in line
    assert "red" not in line and line.endswith("on val")
    artifacts = artifact_paths(mlflow_client, run.info.run_id)
    assert "schedule/stage1_train.csv" in artifacts and "augmentation_preview.png" in artifacts


def test_balanced_sampler_and_plateau_on_cached_features(cli, mlflow_client, imbalanced):
    """With augment=light and 2 cached views: the head trains on cached features of augmented images."""
    result = cli("train", *COMMON, f"data.path={imbalanced}", NO_MODEL, "data.sampler=balanced", "schedule=plateau",
                 "augment=light", "trainer.feature_cache_views=2",
                 "schedule.patience=1", "loss=focal", "optimizer.ema=true", "trainer.accumulate_steps=2",
                 experiment="e2e_recipe_sampler")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_recipe_sampler")
    assert run.data.params["data.sampler"] == "balanced" and run.data.params["loss.name"] == "focal"
    assert "training the head on cached" in result.stdout and "(2 augmented views each" in result.stdout
    assert run.data.tags["feature_cache.train_view1"] in ("miss", "hit")
    assert "moving average" in run.data.tags["optimizer.ema_weights"]
    assert run.data.params["trainer.accumulate_steps"] == "2"
    logged = [m.value for m in mlflow_client.get_metric_history(run.info.run_id, "learning_rate")]
    assert len(logged) == 3 and all(0 < v <= 1e-3 * (1 + 1e-6) for v in logged)


def test_lr_auto_runs_the_range_test_and_trains_at_its_suggestion(cli, mlflow_client, imbalanced):
    result = cli("train", *COMMON, f"data.path={imbalanced}", NO_MODEL, "optimizer.lr=auto", "trainer.lr_find_steps=30",
                 "trainer.epochs=1", experiment="e2e_recipe_lr_auto")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_recipe_lr_auto")
    params = run.data.params
    found = float(params["optimizer.lr_found"])
    assert 1e-7 <= found <= 1.0 and float(params["stage1.lr"]) == pytest.approx(found, rel=1e-3)
    assert float(params["lr_find.suggested_lr"]) == pytest.approx(found, rel=1e-3)
    artifacts = artifact_paths(mlflow_client, run.info.run_id)
    assert "lr_find/lr_find.png" in artifacts and "lr_find/lr_find.csv" in artifacts
    assert "suggested learning rate" in result.stdout


def test_lr_find_command_logs_the_plot_and_suggestion_and_trains_nothing(cli, mlflow_client, imbalanced):
    result = cli("lr_find", *COMMON, f"data.path={imbalanced}", "trainer.lr_find_steps=20",
                 experiment="e2e_lr_find")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_lr_find")
    assert run.data.tags["finetune.command"] == "lr_find" and run.info.status == "FINISHED"
    suggested = float(run.data.params["lr_find.suggested_lr"])
    assert f"suggested optimizer.lr   {suggested:.3g}" in result.stdout
    artifacts = artifact_paths(mlflow_client, run.info.run_id)
    assert "lr_find/lr_find.png" in artifacts and not any(a.startswith("model") for a in artifacts)
    assert int(run.data.params["lr_find.steps"]) <= 20


def test_gradual_unfreezing_trains_one_more_block_each_epoch_on_one_schedule(cli, mlflow_client, imbalanced):
    """VGG16's block map: stem, block1..block5, top (pooling, no weights): the head, then block5, then
    block4 too; the cosine schedule spans the 3 epochs (warmup once)."""
    result = cli("train", *COMMON, f"data.path={imbalanced}", NO_MODEL, "freeze=gradual", "freeze.every=1",
                 "schedule=cosine", "trainer.bn_recalibration=false", "optimizer.layer_decay=0.5",
                 "freeze.lr_mult={block1: 0.01}", experiment="e2e_recipe_gradual")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, "e2e_recipe_gradual")
    params = run.data.params
    assert [params[f"stage{i}.name"] for i in (1, 2, 3)] == ["train_top0", "train_top1", "train_top2"]
    # per-block rates: block5 (the top weighted block) x0.5, block4 x0.25, ...; block1 set outright
    assert [float(params[f"lr_mult.block{i}"]) for i in (5, 4, 3, 2, 1)] == [0.5, 0.25, 0.125, 0.0625, 0.01]
    head = int(params["stage1.params_trainable"])
    block5 = 3 * (3 * 3 * 512 * 512 + 512)
    block4 = (3 * 3 * 256 * 512 + 512) + 2 * (3 * 3 * 512 * 512 + 512)
    assert int(params["stage2.params_trainable"]) == head + block5
    assert int(params["stage3.params_trainable"]) == head + block5 + block4
    per_epoch = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, "params_trainable"))
    assert [v for _, v in per_epoch] == [head, head + block5, head + block5 + block4]
    rates = [m.value for m in sorted(mlflow_client.get_metric_history(run.info.run_id, "learning_rate"),
                                     key=lambda m: m.step)]
    assert rates[0] > rates[1] > rates[2]  # one cosine over the stage, not a restart at each unfreeze
