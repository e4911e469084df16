"""The learning-rate range test (Smith 2015; fastai's lr_find): train a few steps at an exponentially
rising rate, watch the loss, suggest a rate, then put the weights and the optimizer back.

    rate of step i of N = start * (end / start) ** (i / (N - 1))
    smoothed loss       = exponential moving average (beta 0.98), bias-corrected
    suggestion          = the rate where the smoothed loss falls fastest, as fastai's "steep" suggestion:
                          the most negative slope of the smoothed loss against log10(rate), each slope a
                          least-squares line over one decade of rates around the point, the first 10% of
                          steps left out. (Point-to-point slopes, as first shipped, picked 4e-7 on a
                          50-image target in the transfer demo: the first steps' batch-to-batch noise
                          looked steeper than the real descent near 1e-2; over a decade it averages out.)
                          When the smoothed loss never falls 5% below its level over the first decade (nothing learns
                          at any rate in these steps: a deep network from random weights on 50 images),
                          there is no descent to pick: the suggestion is FALLBACK_LR, and it says so.
    stop                early once the smoothed loss exceeds 4x its best (it has diverged)

Used by `finetune lr_find` and by `finetune train optimizer.lr=auto` (on the first stage as configured,
on cached features when the backbone is frozen); the chosen rate is recorded, and a resumed run reads it
back from its checkpoint instead of searching again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

START_LR, END_LR, STEPS = 1e-7, 1.0, 100
BETA, DIVERGED = 0.98, 4.0
MIN_DROP, FALLBACK_LR = 0.05, 1e-3  # Adam's default rate (Keras'), for a test that found no descent


@dataclass
class RangeTest:
    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = float("nan")
    fallback: bool = False  # True: the loss never fell MIN_DROP below its start; suggestion = FALLBACK_LR

    def suggest(self, skip_start: int | None = None, skip_end: int = 3) -> float:
        """The rate at the steepest sustained descent of the smoothed loss (see the module docstring)."""
        rates, losses = np.asarray(self.rates), np.asarray(self.smoothed)
        skip_start = max(5, len(rates) // 10) if skip_start is None else skip_start
        if len(rates) > skip_start + skip_end + 3:
            rates, losses = rates[skip_start:len(rates) - skip_end], losses[skip_start:len(losses) - skip_end]
        if len(rates) < 3:
            self.suggestion = float(rates[0]) if len(rates) else float("nan")
            return self.suggestion
        logs = np.log10(rates)
        start = float(np.mean(losses[logs <= logs[0] + 1.0]))  # the first decade's level, not one noisy point
        if losses.min() > start - MIN_DROP * abs(start):
            self.fallback, self.suggestion = True, FALLBACK_LR
            return self.suggestion
        slopes = []
        for centre in logs:
            near = np.abs(logs - centre) <= 0.5  # one decade of rates around the point
            if near.sum() < 3:
                near = np.argsort(np.abs(logs - centre))[:3]
            slopes.append(np.polyfit(logs[near], losses[near], 1)[0])
        self.suggestion = float(rates[int(np.argmin(slopes))])
        return self.suggestion


def rate_at(step: int, steps: int, start: float = START_LR, end: float = END_LR) -> float:
    return start * (end / start) ** (step / max(1, steps - 1))


def range_test(model, train_ds, steps: int = STEPS, start: float = START_LR, end: float = END_LR,
               class_weight: dict | None = None) -> RangeTest:
    """Run the range test on a compiled `model` over batches of the repeated `train_ds`; weights and
    optimizer state are restored afterwards (the model is as it was)."""
    weights = [w.numpy().copy() for w in model.weights]
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    optimizer_state = [v.numpy().copy() for v in optimizer.variables]
    result, best, average = RangeTest(), math.inf, 0.0
    try:
        for step, batch in enumerate(train_ds.take(steps)):
            x, y = batch[0], batch[1]
            lr = rate_at(step, steps, start, end)
            optimizer.learning_rate = lr
            sample_weight = None
            if class_weight is not None:
                labels = np.asarray(y)
                labels = labels.argmax(axis=-1) if labels.ndim > 1 else labels
                sample_weight = np.asarray([class_weight[int(c)] for c in labels], np.float32)
            loss = float(np.asarray(model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)["loss"]))
            average = BETA * average + (1 - BETA) * loss
            smooth = average / (1 - BETA ** (step + 1))
            result.rates.append(lr)
            result.losses.append(loss)
            result.smoothed.append(smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or smooth > DIVERGED * best:
                break
    finally:
        for variable, value in zip(model.weights, weights):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, optimizer_state):
            variable.assign(value)
        model.reset_metrics()
    result.suggest()
    return result


def plot(result: RangeTest, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.rates, result.losses, alpha=0.3, label="loss")
    ax.plot(result.rates, result.smoothed, label="smoothed loss")
    if math.isfinite(result.suggestion):
        ax.axvline(result.suggestion, color="red", linestyle="--", label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def record(result: RangeTest, out: Path, title: str) -> None:
    """lr_find.png and lr_find.csv in `out`, both logged; the suggestion as the param lr_find.suggested_lr."""
    from finetune import tracking

    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "lr_find.png", title)
    (out / "lr_find.csv").write_text("learning_rate,loss,smoothed_loss\n" + "".join(
        f"{r:.6g},{loss:.6g},{s:.6g}\n" for r, loss, s in zip(result.rates, result.losses, result.smoothed)))
    tracking.log_artifact(str(out / "lr_find.png"), "lr_find")
    tracking.log_artifact(str(out / "lr_find.csv"), "lr_find")
    tracking.log_params({"lr_find.suggested_lr": f"{result.suggestion:.4g}", "lr_find.steps": len(result.rates),
                         "lr_find.no_descent": result.fallback})


def describe(result: RangeTest) -> str:
    """How the suggestion was reached, for the console."""
    if result.fallback:
        return (f"no descent: the smoothed loss never fell {MIN_DROP:.0%} below its start in {len(result.rates)} "
                f"steps, so the default {FALLBACK_LR:g}; more steps (trainer.lr_find_steps) or a set rate may do better")
    return f"steepest descent of the smoothed loss over {len(result.rates)} steps"
