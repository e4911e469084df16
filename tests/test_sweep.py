"""Hydra multirun through the CLI: one MLflow parent run per sweep, one child per job, none left RUNNING."""
from __future__ import annotations

import pytest

from tests.conftest import TINY, TINY_SHAPES, runs_of

pytestmark = pytest.mark.slow


def test_grid_sweep_makes_parent_and_children(cli, mlflow_client):
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "optimizer.lr=1e-3,1e-2", experiment="e2e_sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(mlflow_client, "e2e_sweep")
    parents = [r for r in runs if r.data.tags.get("finetune.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("finetune.sweep") == "child"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.001", "0.01"]
    best = max(c.data.metrics["final_val_accuracy"] for c in children)
    assert parent.data.metrics["best_final_val_accuracy"] == best
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}

    compare = cli("compare", f"compare.sweep={parent.info.run_id}", experiment="e2e_sweep")
    assert compare.returncode == 0, compare.stderr[-3000:]
    lines = compare.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert "optimizer.lr" in lines[header] and "final_val_accuracy" in lines[header]
    shown = [float(line.split()[3]) for line in lines[header + 1:header + 3]]
    assert shown == sorted(shown, reverse=True)
    logged = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "compare")}
    assert logged == {"compare/compare.csv", "compare/compare.png"}


def test_a_failing_job_never_leaves_the_parent_running(cli, mlflow_client):
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "freeze=last_n", "freeze.n=1,99",
                 experiment="e2e_sweep_failing")
    assert result.returncode != 0
    runs = runs_of(mlflow_client, "e2e_sweep_failing")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("finetune.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "freeze.n=99" in parent.data.tags["failed_job"]
