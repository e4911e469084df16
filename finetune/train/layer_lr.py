"""Per-block learning rates: `optimizer.layer_decay` (timm's layer decay) and `freeze.lr_mult`.

    block i of the block map, counted from the top among the blocks with weights (i = 1 for the topmost),
    trains at lr x layer_decay ** i; the head at lr. freeze.lr_mult={block: m} sets a block's multiplier
    outright (over layer_decay).

Keras 3 has no per-variable learning rate, and scaling gradients instead does not work for adaptive
optimizers (Adam's step does not depend on the gradient's scale). So the optimizer's class is given an
`update_step` that multiplies the learning rate by the variable's multiplier (`with_lr_multipliers`):
one optimizer, the same state and checkpoints, any optimizer Keras has. Saved models carry no optimizer,
so they still load with plain Keras.
"""
from __future__ import annotations

from finetune.errors import ConfigError

_SCALED: dict[type, type] = {}


def block_multipliers(blocks, layer_decay: float | None, lr_mult: dict | None) -> dict[str, float]:
    """{block name: multiplier} for the blocks whose rate is not the optimizer's."""
    names = [name for name, _ in blocks]
    weighted = [name for name, layers in reversed(blocks) if any(layer.weights for layer in layers)]
    multipliers = {}
    if layer_decay is not None and float(layer_decay) != 1.0:
        multipliers = {name: float(layer_decay) ** i for i, name in enumerate(weighted, start=1)}
    for name, value in dict(lr_mult or {}).items():
        if str(name) not in names:
            raise ConfigError(f"freeze.lr_mult.{name}", value, f"a block of the block map: {', '.join(names)}")
        multipliers[str(name)] = float(value)
    return multipliers


def variable_multipliers(blocks, multipliers: dict[str, float]) -> list[tuple]:
    """(trainable variable, multiplier) of each variable of the blocks in `multipliers` (Keras variables
    are not hashable: pairs, not a dict)."""
    return [(weight, multipliers[name]) for name, layers in blocks if name in multipliers
            for layer in layers for weight in layer.trainable_weights]


def _scaled_update_step(self, gradient, variable, learning_rate):
    multiplier = self._lr_multipliers.get(self._var_key(variable), 1.0)
    if multiplier != 1.0:
        learning_rate = learning_rate * multiplier
    return super(type(self), self).update_step(gradient, variable, learning_rate)


def with_lr_multipliers(optimizer, multipliers: list[tuple]):
    """`optimizer`, updating each variable in `multipliers` at its multiple of the learning rate."""
    if not multipliers:
        return optimizer
    base = type(optimizer)
    if base not in _SCALED:
        _SCALED[base] = type(f"{base.__name__}WithLrMultipliers", (base,), {"update_step": _scaled_update_step})
    optimizer.__class__ = _SCALED[base]
    optimizer._lr_multipliers = {optimizer._var_key(v): float(m) for v, m in multipliers}
    return optimizer
