"""Fitting BatchNorm moving statistics to the data, for the BatchNorm layers that trained.

With Keras' default momentum (0.99) a short run on a small dataset leaves the moving statistics far
from the data the layer saw, so inference-mode accuracy collapses while training accuracy is high.
Two remedies, both on by default: a momentum derived from the steps per epoch while training (so
per-epoch validation is meaningful), and re-estimating the statistics exactly after each stage.
"""
from __future__ import annotations


def momentum_for(steps_per_epoch: int, default: float = 0.99) -> float:
    """A momentum whose moving average spans about a third of an epoch, never above the default."""
    return float(min(default, max(0.5, 1.0 - 3.0 / max(1, steps_per_epoch))))


def set_momentum(layers, momentum: float) -> None:
    for layer in layers:
        layer.momentum = momentum


def recalibrate(model, dataset, layers, max_batches: int) -> int:
    """Replace the moving mean/variance of `layers` by their average over up to `max_batches` batches
    of `dataset` (the "precise BN" estimate: momentum 1 - 1/i at the i-th batch makes the moving value
    the running mean of the batch statistics). Other layers are unchanged. Returns batches used."""
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for images, _ in dataset.take(max_batches):
            used += 1
            set_momentum(layers, 1.0 - 1.0 / used)
            model(images, training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return used
