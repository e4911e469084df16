"""trainer.precision / trainer.jit_compile: what auto picks, that it is recorded, and that lower
precision stays within finetune.compute.ACCURACY_TOLERANCE of fp32."""
from __future__ import annotations

import pytest

from finetune.compute import ACCURACY_TOLERANCE, choose
from tests.conftest import TINY, TINY_SHAPES, one_error_line, runs_of


@pytest.mark.parametrize("device, family, precision, jit", [
    ("cpu_bf16", "resnet", "mixed_bfloat16", False),   # measured 1.2x (ResNet50), 2.8x (VGG16) faster
    ("cpu_bf16", "vgg", "mixed_bfloat16", False),
    ("cpu_bf16", "mobilenet_v2", "fp32", False),       # measured 0.6x in bf16: stays fp32
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
def test_bfloat16_stays_within_tolerance_of_fp32_and_is_recorded(cli, mlflow_client, trained_model):
    backbone_file = trained_model["model_dir"].parent / "backbone.weights.h5"  # trained: real features
    metrics = {}
    for precision in ("fp32", "mixed_bfloat16"):
        experiment = f"precision_{precision}"
        result = cli("train", *TINY, *TINY_SHAPES, f"backbone.weights={backbone_file}", "freeze=all",
                     "trainer.epochs=3", "optimizer.lr=1e-2", f"trainer.precision={precision}",
                     experiment=experiment)
        assert result.returncode == 0, result.stderr[-3000:]
        (run,) = runs_of(mlflow_client, experiment)
        assert run.data.params["compute.precision"] == precision
        assert run.data.params["compute.jit_compile"] == "False"
        metrics[precision] = run.data.metrics
    for name in ("final_val_accuracy", "test_accuracy"):
        assert abs(metrics["mixed_bfloat16"][name] - metrics["fp32"][name]) <= ACCURACY_TOLERANCE, name
