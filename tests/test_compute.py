"""trainer.precision / trainer.jit_compile: what auto picks, that it is recorded, and that lower
precision stays within finetune.train.compute.ACCURACY_TOLERANCE of fp32."""
from __future__ import annotations

import pytest

from finetune.train.compute import ACCURACY_TOLERANCE, choose
from tests.conftest import TINY, TINY_SHAPES, one_error_line, runs_of


@pytest.mark.parametrize("device, family, precision, jit", [
    ("cpu_bf16", "resnet", "mixed_bfloat16", False),   # measured 1.2x (ResNet50), 2.8x (VGG16) faster
    ("cpu_bf16", "vgg", "mixed_bfloat16", False),
    ("cpu_bf16", "mobilenet_v2", "fp32", False),       # measured 0.6x in bf16: stays fp32
    ("cpu_bf16", "resnet_v2", "fp32", False),          # never measured: no bf16 by analogy with resnet
    ("cpu", "resnet", "fp32", False),                  # no bf16 units: emulated bf16 is slower
    ("gpu", "resnet", "fp32", False),                  # not measured on a GPU here: nothing assumed
])
def test_auto_picks_what_was_measured_faster(device, family, precision, jit):
    chosen = choose("auto", "auto", family, device)
    assert (chosen.precision, chosen.jit_compile) == (precision, jit)
    assert chosen.reason


def test_an_explicit_setting_wins():
    chosen = choose("mixed_float16", "true", "mobilenet_v2", "cpu")
    assert (chosen.precision, chosen.jit_compile) == ("mixed_float16", True)


@pytest.mark.slow
def test_bad_jit_compile_value_is_one_line(cli):
    line = one_error_line(cli("train", *TINY, *TINY_SHAPES, "trainer.jit_compile=sometimes"))
    assert "trainer.jit_compile" in line and "auto, true or false" in line


@pytest.mark.slow
def test_auto_precision_stays_within_tolerance_of_fp32_and_is_recorded(cli, mlflow_client):
    """VGG16 (a family auto runs in bfloat16 on CPUs with bf16 units; random weights: VGG has no
    BatchNorm, so its features are informative) on the 1,797 digits: validation accuracy with `auto`
    within ACCURACY_TOLERANCE of fp32's. Where auto picks fp32 (no bf16 units) the second run would repeat
    the first, so only the choice and its record are checked there."""
    from finetune.train.compute import choose, device_class_without_tf

    auto = choose("auto", "auto", "vgg", device_class_without_tf()).precision
    metrics = {}
    for precision in ("auto", "fp32") if auto != "fp32" else ("auto",):  # auto = fp32: one run says it all
        experiment = f"precision_{precision}"
        result = cli("train", "backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]",
                     "data=digits", "freeze=all", "head=linear", "trainer.epochs=4", "optimizer.lr=1e-3",
                     "trainer.verbose=0", f"trainer.precision={precision}", "tracking.log_model=false",
                     experiment=experiment)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = runs_of(mlflow_client, experiment)
        expected = "fp32" if precision == "fp32" else auto
        assert run.data.params["compute.precision"] == expected
        assert run.data.params["compute.jit_compile"] == "False" and run.data.tags["compute.reason"]
        metrics[precision] = run.data.metrics
    assert metrics["auto"]["final_val_accuracy"] > 0.2  # well above chance (0.1): a comparison that means something
    if "fp32" in metrics:  # the tolerance is on the validation set (359 images); the 179 test images resolve ~4%
        assert abs(metrics["auto"]["final_val_accuracy"] - metrics["fp32"]["final_val_accuracy"]) <= ACCURACY_TOLERANCE
