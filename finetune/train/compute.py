"""Numeric precision and XLA compilation, chosen per device class and backbone family.

`trainer.precision=auto` and `trainer.jit_compile=auto` pick what was measured fastest
(scripts/bench_precision.py) for this kind of device and the
backbone's family; anything not measured stays at fp32 without XLA. An explicit value always wins.

Measured here (scripts/bench_precision.py, whole-network training, 128 px, batch 32, 2-core Xeon with
AVX512-BF16/AMX), mixed_bfloat16 vs fp32: VGG16 2.8x, ResNet50 1.2x faster; MobileNetV2 0.6x (its
depthwise convolutions are memory-bound and gain nothing from bf16 units). Families not measured stay
fp32. XLA (jit_compile) on this machine class made MobileNetV2 ~10x slower and ResNet50 0.9x (issue 5's
measurements): never on a CPU.
GPUs were not available to measure: auto keeps fp32 without XLA there (nothing assumed); measure your
GPU with the script and set trainer.precision / trainer.jit_compile, or add a GPU_RULES entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "mixed_bfloat16", "mixed_float16")
KERAS_POLICY = {"fp32": "float32", "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}
# Families measured faster in bf16 on a CPU with bf16 units (ResNet50 1.2x, VGG16 2.8x). Only measured
# families: resnet_v2 looks alike (dense convolutions) but was not measured, so it stays fp32.
CPU_BF16_FAMILIES = frozenset({"resnet", "vgg"})
# GPU: (precision, jit) per family, from a GPU run of scripts/bench_precision.py; others: GPU_DEFAULT.
GPU_DEFAULT = ("fp32", False)
GPU_RULES: dict[str, tuple[str, bool]] = {}
# Largest accuracy drop (absolute, on the validation set) that auto precision is allowed against fp32,
# checked by tests/test_compute.py (VGG16 on the 1,797 digits; measured: 0.398 fp32, 0.404 bf16).
ACCURACY_TOLERANCE = 0.02


@dataclass(frozen=True)
class ComputeChoice:
    precision: str
    jit_compile: bool
    reason: str
    distribution: object = None  # finetune.train.distribute.Distribution (None: one device)

    @property
    def keras_policy(self) -> str:
        return KERAS_POLICY[self.precision]


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def device_class() -> str:
    """'gpu', 'cpu_bf16' or 'cpu' (imports TensorFlow to look for GPUs)."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "gpu"
    return device_class_without_tf()


def device_class_without_tf() -> str:
    """The CPU's class ('cpu_bf16' or 'cpu'), for a machine known to have no GPU."""
    return "cpu_bf16" if cpu_has_bf16() else "cpu"


def choose(precision: str, jit_compile: str, family: str, device: str) -> ComputeChoice:
    """The precision and XLA setting for a run. `precision`: auto|fp32|mixed_bfloat16|mixed_float16;
    `jit_compile`: auto|true|false; `device`: as device_class() says."""
    reasons = []
    if precision == "auto":
        if device == "gpu":
            precision = GPU_RULES.get(family, GPU_DEFAULT)[0]
            reasons.append(f"precision {precision}: GPU" + ("" if family in GPU_RULES else ", not measured"))
        elif device == "cpu_bf16" and family in CPU_BF16_FAMILIES:
            precision = "mixed_bfloat16"
            reasons.append(f"precision mixed_bfloat16: CPU with bf16 units, {family} measured faster in bf16")
        else:
            precision = "fp32"
            reasons.append(f"precision fp32: {device}, {family} not measured faster in lower precision")
    if jit_compile == "auto":
        jit = device == "gpu" and GPU_RULES.get(family, GPU_DEFAULT)[1]
        reasons.append(f"jit_compile {jit}: " + ("GPU" if device == "gpu" else "XLA measured slower on CPUs"))
    else:
        jit = str(jit_compile).lower() == "true"
    return ComputeChoice(precision=precision, jit_compile=bool(jit), reason="; ".join(reasons) or "as configured")
