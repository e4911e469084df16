"""A frozen backbone's features are computed once, reused by later runs, and give the same training."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest

from tests.conftest import TINY, TINY_SHAPES, runs_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A MobileNetV2 (32 px) weights file whose BatchNorm layers shift their outputs: a freshly initialised
    MobileNetV2 in inference mode maps every image to nearly the same ~0 features; this one does not."""
    import keras
    import numpy as np

    model = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, rng.normal(0.5, 0.25, beta.shape).astype(beta.dtype), mean, var])
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_32.weights.h5"
    model.save_weights(path)
    return path


def frozen_run(cli, mlflow_client, backbone_file, experiment, *extra, cache_dir=None):
    result = cli("train", *TINY, *TINY_SHAPES, f"backbone.weights={backbone_file}", "freeze=all",
                 "trainer.epochs=3", "optimizer.lr=1e-2", *extra, experiment=experiment,
                 env={"FINETUNE_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = runs_of(mlflow_client, experiment)
    return result, run


def test_frozen_training_extracts_once_then_reuses_the_features(cli, mlflow_client, backbone_file, tmp_path):
    run = functools.partial(frozen_run, cli, mlflow_client, backbone_file, cache_dir=tmp_path)  # its own cache
    first, miss = run("cache_miss")
    assert "feature cache miss (train)" in first.stdout and "feature cache miss (val)" in first.stdout
    assert miss.data.tags["feature_cache"] == "miss"
    keys = {split: miss.data.params[f"feature_cache.{split}.key"] for split in ("train", "val", "test")}

    second, hit = run("cache_hit")
    assert "feature cache hit (train)" in second.stdout and "miss" not in second.stdout
    assert hit.data.tags["feature_cache"] == "hit"
    assert {s: hit.data.params[f"feature_cache.{s}.key"] for s in keys} == keys
    quality = {k: v for k, v in miss.data.metrics.items() if k != "process_rss_mb"}
    assert {k: hit.data.metrics[k] for k in quality} == pytest.approx(quality, abs=1e-6)

    # the same training with images through the backbone every epoch: same results
    third, plain = run("cache_off", "trainer.feature_cache=off")
    assert "feature cache" not in third.stdout and "feature_cache" not in plain.data.tags
    for name in ("final_val_accuracy", "test_accuracy"):
        assert plain.data.metrics[name] == miss.data.metrics[name], name
    for name in ("final_val_loss", "test_loss", "loss"):
        assert plain.data.metrics[name] == pytest.approx(miss.data.metrics[name], abs=2e-3), name
    # degenerate (all-equal) features would leave the loss at ln(3) and make this comparison empty
    assert abs(miss.data.metrics["loss"] - math.log(3)) > 0.05, "features carry no signal"

    # the augmentation preview is drawn once, kept in the cache folder, and reused by the next runs
    (kept,) = (tmp_path / "previews").glob("*.png")
    previews = [Path(mlflow_client.download_artifacts(r.info.run_id, "augmentation_preview.png", str(tmp_path / name)))
                for r, name in ((miss, "a"), (hit, "b"), (plain, "c"))]
    assert all(p.read_bytes() == kept.read_bytes() for p in previews)

    env = {"FINETUNE_CACHE_DIR": str(tmp_path)}
    listed = cli("cache", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert all(key in listed.stdout for key in keys.values())
    cleared = cli("cache", "cache.action=clear", f"cache.key={keys['train']}", env=env)
    assert cleared.returncode == 0 and "removed 1 entry" in cleared.stdout, cleared.stderr[-2000:]
    after = cli("cache", env=env).stdout
    assert keys["train"] not in after and keys["val"] in after
    bad = cli("cache", "cache.action=clear", "cache.key=nope", env=env)
    assert bad.returncode == 2 and "cache.key" in bad.stderr
