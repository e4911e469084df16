"""Freeze policies over a backbone's block map, the BatchNorm policy, and the printed freeze plan."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import keras

POLICIES = ("all", "none", "last_n")  # the keys of FREEZE_POLICIES below


@dataclass
class BlockPlan:
    name: str
    trainable: bool
    layers: list[str]
    trainable_params: int
    frozen_params: int


def _last_n(block_names: list[str], n: int) -> set[str]:
    if not 0 <= n <= len(block_names):
        raise ValueError(f"Expected 0 <= n <= {len(block_names)}. Received: n={n}")
    return set(block_names[len(block_names) - n:]) if n else set()


# freeze policy -> (the backbone's block names in order, n) -> the names of the blocks that train
FREEZE_POLICIES = {
    "all": lambda block_names, n: set(),
    "none": lambda block_names, n: set(block_names),
    "last_n": _last_n,
}


def trainable_blocks(block_names: list[str], policy: str, n: int) -> set[str]:
    """Names of the blocks that train under `policy` (all: none of them; none: every one)."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"Expected policy in {tuple(FREEZE_POLICIES)}. Received: policy={policy!r}")
    return FREEZE_POLICIES[policy](block_names, n)


def apply_freeze(backbone, blocks, policy: str, n: int, batchnorm: str = "frozen") -> list[BlockPlan]:
    """Set `trainable` on every backbone layer; returns the plan.

    batchnorm="frozen": BatchNorm layers follow their block (frozen ones run in inference mode and
    keep their moving statistics, as Keras does for trainable=False). batchnorm="train": BatchNorm
    layers train even inside frozen blocks.
    """
    training = trainable_blocks([name for name, _ in blocks], policy, n)
    backbone.trainable = True
    plan = []
    for name, layers in blocks:
        for layer in layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = name in training or (is_bn and batchnorm == "train")
        plan.append(BlockPlan(
            name=name,
            trainable=name in training,
            layers=[layer.name for layer in layers],
            trainable_params=sum(_count(layer.trainable_weights) for layer in layers),
            frozen_params=sum(_count(layer.non_trainable_weights) for layer in layers),
        ))
    return plan


def unfreeze_steps(blocks) -> list[int]:
    """The last_n values that each make one more block with weights trainable, counting from the top of
    the block map (what gradual unfreezing steps through)."""
    return [k for k in range(1, len(blocks) + 1) if any(layer.weights for layer in blocks[-k][1])]


def trained_batchnorm_layers(model) -> list:
    """BatchNorm layers that run in training mode during fit (their moving statistics change)."""
    return [layer for layer in _walk(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def format_plan(plan: list[BlockPlan], title: str = "freeze plan") -> str:
    width = max([len(b.name) for b in plan] + [5])
    lines = [title, f"  {'block':<{width}}  {'state':<9} {'layers':>6} {'trainable':>12} {'frozen':>12}"]
    for b in plan:
        state = "trainable" if b.trainable else "frozen"
        lines.append(f"  {b.name:<{width}}  {state:<9} {len(b.layers):>6} "
                     f"{b.trainable_params:>12,} {b.frozen_params:>12,}")
    total_t = sum(b.trainable_params for b in plan)
    total_f = sum(b.frozen_params for b in plan)
    lines.append(f"  {'total':<{width}}  {'':<9} {sum(len(b.layers) for b in plan):>6} "
                 f"{total_t:>12,} {total_f:>12,}")
    return "\n".join(lines)


def plan_json(plan: list[BlockPlan]) -> str:
    return json.dumps([asdict(b) for b in plan], indent=1)


def _count(weights) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def _walk(layer):
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from _walk(sub)
