"""`finetune compare` lists the best run first: highest accuracy, lowest loss."""
from __future__ import annotations

import csv

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra

from finetune.commands import compare
from finetune.config.paths import conf_dir
from finetune.config.schema import register_configs

# run name -> (optimizer.lr, final_val_accuracy, final_val_loss); "unscored" logged neither metric
RUNS = {"good": ("0.001", 0.9, 0.3), "bad": ("0.1", 0.4, 1.7), "middle": ("0.01", 0.7, 0.8),
        "unscored": ("0.5", None, None)}


def compose(*overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return hydra.compose("compare", overrides=list(overrides))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    tmp_path = tmp_path_factory.mktemp("compare_store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, (lr, accuracy, loss) in RUNS.items():
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "optimizer.lr", lr)
        if accuracy is not None:
            client.log_metric(run.info.run_id, "final_val_accuracy", accuracy)
            client.log_metric(run.info.run_id, "final_val_loss", loss)
        client.set_terminated(run.info.run_id)
    return uri


@pytest.mark.parametrize("metric, order, first", [
    ("final_val_accuracy", ["good", "middle", "bad", "unscored"], "highest"),
    ("final_val_loss", ["good", "middle", "bad", "unscored"], "lowest"),
])
def test_compare_lists_the_best_run_first(store, tmp_path, capsys, metric, order, first):
    cfg = compose(f"tracking.uri={store}", "tracking.experiment=cmp", f"compare.metric={metric}")
    assert compare.run(cfg, tmp_path / metric) == {"runs": 4}
    with (tmp_path / metric / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run_name"] for row in rows] == order
    assert [row["optimizer.lr"] for row in rows] == [RUNS[name][0] for name in order]
    assert f"{first} {metric} first" in capsys.readouterr().out


def test_lower_is_better_for_losses_and_errors_only():
    assert [compare.lower_is_better(m) for m in ("final_val_loss", "eval_test_loss", "val_mean_absolute_error")] \
        == [True, True, True]
    assert [compare.lower_is_better(m) for m in ("final_val_accuracy", "eval_test_f1_cat", "best_final_val_accuracy")] \
        == [False, False, False]


def test_swept_group_choices_are_columns_and_numbers_get_numeric_axes(tmp_path, capsys):
    """A head_optuna-like sweep: `head=mlp` lands in the param head.name, Optuna's learning rates have 17
    digits. The table shows the head column and short numbers; the plot puts lr on a log axis."""
    from mlflow import MlflowClient

    from finetune.tracking.scope import SWEEP_OVERRIDES_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("optuna", artifact_location=(tmp_path / "artifacts").as_uri())
    trials = [("linear", "0.00012345678901234567", "0.1", 0.5), ("mlp", "0.0123456789012345678", "0.3", 0.8),
              ("mlp", "0.0011", "0.2", 0.7)]
    for i, (head, lr, dropout, accuracy) in enumerate(trials):
        run = client.create_run(experiment, run_name=f"trial{i}")
        for key, value in {"head.name": head, "optimizer.lr": lr, "head.dropout": dropout}.items():
            client.log_param(run.info.run_id, key, value)
        client.set_tag(run.info.run_id, SWEEP_OVERRIDES_TAG, f"head={head} optimizer.lr={lr} head.dropout={dropout}")
        client.log_metric(run.info.run_id, "final_val_accuracy", accuracy)
        client.set_terminated(run.info.run_id)
    runs = client.search_runs([experiment])
    assert compare.swept_params(runs) == ["head.name", "optimizer.lr", "head.dropout"]
    assert [compare.axis_kind(c, [r.data.params[c] for r in runs]) for c in compare.swept_params(runs)] \
        == ["category", "log", "linear"]
    cfg = compose(f"tracking.uri={uri}", "tracking.experiment=optuna")
    compare.run(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert "head.name" in out and "0.01235" in out and "0.0123456789" not in out
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
