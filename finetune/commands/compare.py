"""`finetune compare`: the runs of a sweep or an experiment as a table sorted by a metric, plus a plot."""
from __future__ import annotations

import csv
from pathlib import Path

from finetune.errors import ConfigError

# A metric whose name holds one of these is better when lower (final_val_loss, eval_test_loss, ...);
# every other (accuracy, F1, ...) is better when higher. Best runs come first either way.
LOWER_IS_BETTER = ("loss", "error")


def run(cfg, output_dir: Path) -> dict:
    from mlflow import MlflowClient

    from finetune.tracking.store import tracking_uri

    options = cfg.compare
    client = MlflowClient(tracking_uri=tracking_uri(cfg.tracking))
    name = options.experiment or cfg.tracking.experiment
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ConfigError("compare.experiment", name, f"an experiment in {tracking_uri(cfg.tracking)}")
    if options.sweep:
        runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{options.sweep}'")
        if not runs:
            raise ConfigError("compare.sweep", options.sweep, f"the parent run id of a sweep in experiment {name!r}")
    else:
        runs = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("finetune.sweep") != "parent"]
    columns = swept_params(runs)
    rows = best_first([table_row(r, columns, options.metric) for r in runs], options.metric)[:options.limit]
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / "compare.csv"
    write_csv(rows, table)
    if options.output:
        write_csv(rows, Path(str(options.output)).expanduser())
    plot = output_dir / "compare.png"
    plot_metric(rows, columns, options.metric, plot)
    if options.sweep:  # the comparison belongs to the sweep: added to its parent run, whose status stays
        from finetune import tracking

        with tracking.run(cfg, command="compare", output_dir=output_dir, add_to_run_id=options.sweep) as parent:
            parent.log_artifact(table, "compare")
            parent.log_artifact(plot, "compare")
    print_table(rows, columns, options.metric)
    if options.register:
        promote(client, rows, options, output_dir)
    print(f"\n{len(rows)} run(s) of {name!r}{' in sweep ' + options.sweep if options.sweep else ''}; "
          f"{'lowest' if lower_is_better(options.metric) else 'highest'} {options.metric} first; "
          f"table {table}, plot {plot}")
    return {"runs": len(rows)}


def promote(client, rows: list[dict], options, output_dir: Path) -> None:
    """compare.register: the best run's model registered, compare.alias pointing at the new version."""
    from finetune.tracking.mlflow_model import register_with_alias

    best = next((row for row in rows if row[options.metric] is not None and row["status"] == "FINISHED"), None)
    if best is None:
        raise ConfigError("compare.register", options.register, f"runs with {options.metric} to choose from")
    version = register_with_alias(client, best["run_id"], options.register, options.alias, output_dir / "registry")
    print(f"\nregistered the best run {best['run_id']} ({options.metric} {best[options.metric]:.4f}) as "
          f"models:/{options.register}/{version}, alias {options.alias!r}: model=models:/{options.register}@"
          f"{options.alias} (finetune predict/evaluate/export; mlflow models serve -m the same URI)")


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def best_first(rows: list[dict], metric: str) -> list[dict]:
    """Rows sorted best first by `metric` (ascending for losses and errors); runs without it last."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    return sorted(rows, key=lambda row: (row[metric] is None, sign * (row[metric] or 0.0)))


def param_key(key: str, runs) -> str:
    """The param an override key landed in: the key itself, or for a config group choice (`head=mlp`) the
    group's `name` param (`head.name`)."""
    if any(key in r.data.params for r in runs) or not any(f"{key}.name" in r.data.params for r in runs):
        return key
    return f"{key}.name"


def swept_params(runs) -> list[str]:
    """A sweep's overridden keys (from each child's overrides tag; group choices as `<group>.name`), else
    the params that differ."""
    from finetune.tracking.scope import SWEEP_OVERRIDES_TAG

    keys: dict[str, None] = {}
    for r in runs:
        overrides = r.data.tags.get(SWEEP_OVERRIDES_TAG, r.data.tags.get("sweep_overrides", ""))  # (older runs)
        for token in overrides.split():
            key = param_key(token.split("=", 1)[0].lstrip("+~"), runs)
            if "=" in token and len({x.data.params.get(key) for x in runs}) > 1:
                keys[key] = None
    if keys:
        return list(keys)
    names = sorted({k for r in runs for k in r.data.params if "." in k and not k.startswith("stage")})
    return [k for k in names if len({r.data.params.get(k) for r in runs}) > 1]


def table_row(run, columns: list[str], metric: str) -> dict:
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            metric: run.data.metrics.get(metric), **{c: run.data.params.get(c) for c in columns}}


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run_id"])
        writer.writeheader()
        writer.writerows(rows)


# params whose values span decades: a log axis (also any positive numeric param spanning >= 100x)
LOG_SCALE_PARAMS = ("lr", "learning_rate", "weight_decay", "lr_found")


def numeric(values) -> list[float] | None:
    """The values as floats when every one is a number, else None (a categorical parameter)."""
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def axis_kind(column: str, values) -> str:
    """'log', 'linear' or 'category': how a parameter's axis is drawn."""
    numbers = numeric(values)
    if numbers is None or not numbers:
        return "category"
    positive = min(numbers) > 0
    if positive and (column.split(".")[-1] in LOG_SCALE_PARAMS or max(numbers) / min(numbers) >= 100):
        return "log"
    return "linear"


def plot_metric(rows: list[dict], columns: list[str], metric: str, path: Path) -> None:
    """The metric against each swept parameter, one panel per parameter: numeric parameters on a numeric
    axis (learning rates and other multi-decade ones on a log axis), group choices and other text as
    categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = columns or ["run_name"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    scored = [r for r in rows if r[metric] is not None]
    for ax, column in zip(axes[0], panels):
        points = [r for r in scored if r.get(column) is not None]
        kind = axis_kind(column, [r.get(column) for r in points])
        if kind == "category":
            values = sorted({str(r.get(column)) for r in points})
            ax.scatter([values.index(str(r.get(column))) for r in points], [r[metric] for r in points])
            ax.set_xticks(range(len(values)), values, rotation=30, ha="right")
        else:
            ax.scatter(numeric(r.get(column) for r in points), [r[metric] for r in points])
            ax.set_xscale(kind)
        ax.set_xlabel(column)
        ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict], columns: list[str], metric: str) -> None:
    header = ["#", "run", "status", metric, *columns]
    lines = [[str(i + 1), r["run_name"] or r["run_id"][:8], r["status"],
              "-" if r[metric] is None else f"{r[metric]:.4f}", *[readable(r.get(c)) for c in columns]]
             for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


def readable(value) -> str:
    """A parameter as a person reads it: numbers to 4 significant digits (Optuna's 0.00123456789012345
    becomes 0.001235), text as it is."""
    number = numeric([value]) if value is not None else None
    if number is None or str(value).strip().lower() in ("true", "false"):
        return str(value)
    return f"{number[0]:.4g}" if "." in str(value) or "e" in str(value).lower() else str(value)
