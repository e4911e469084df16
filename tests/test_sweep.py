"""Hydra multirun through the CLI: one MLflow parent run per sweep, one child per job, none left RUNNING."""
from __future__ import annotations

import csv

import pytest

from tests.conftest import TINY, TINY_SHAPES, runs_of, sweep_runs, write_shape_images

pytestmark = pytest.mark.slow

# Spread of the jobs' resident memory. Each job in a fresh process: within ~10 MB of each other. All in
# one process (trainer.isolate_sweep_jobs=false), training MobileNetV2 end to end grew ~190 MB per job
# here (scripts/bench_sweep_memory.py freeze=none: 1499 -> 2458 MB over 6 jobs).
RSS_SPREAD_LIMIT_MB = 60


def assert_parent_and_children(client, experiment, jobs: int):
    parents, children = sweep_runs(client, experiment)
    assert len(parents) == 1 and len(children) == jobs, (len(parents), len(children))
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert [c.info.status for c in children] == ["FINISHED"] * jobs
    return parent, children


def test_grid_sweep_makes_parent_and_children(cli, mlflow_client):
    # 2 jobs with Hydra's basic launcher that train the backbone, each in a fresh process
    # (trainer.isolate_sweep_jobs): memory does not grow job after job (scripts/bench_sweep_memory.py
    # measures 6 jobs with and without)
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "optimizer.lr=1e-3,3e-2", "head=mlp", "backbone=vgg16",
                 "freeze=last_n", "freeze.n=1", experiment="e2e_sweep")  # VGG16: traces in seconds
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = assert_parent_and_children(mlflow_client, "e2e_sweep", 2)
    assert sorted((c.data.params["optimizer.lr"], c.data.params["head.name"]) for c in children) == [
        ("0.001", "mlp"), ("0.03", "mlp")]
    assert sorted(c.info.run_name for c in children) == [f"job {n}" for n in range(2)]
    by_job = sorted(children, key=lambda c: int(c.data.tags["finetune.sweep_job"]))
    rss = [c.data.metrics["process_rss_mb"] for c in by_job]
    # growth over the first job's (which alone draws the augmentation preview the next jobs link: it may be higher)
    assert max(rss) - rss[0] < RSS_SPREAD_LIMIT_MB, f"memory grows from job to job: {rss}"
    assert len({c.data.tags["finetune.process_id"] for c in children}) == 2, "jobs shared a process"
    best = max(c.data.metrics["final_val_accuracy"] for c in children)
    assert parent.data.metrics["best_final_val_accuracy"] == best
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}

    compare = cli("compare", f"compare.sweep={parent.info.run_id}", experiment="e2e_sweep")
    assert compare.returncode == 0, compare.stderr[-3000:]
    lines = compare.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert "optimizer.lr" in lines[header] and "final_val_accuracy" in lines[header]
    column = lines[header].index("final_val_accuracy")  # a fixed-width table; run names hold spaces
    shown = [float(line[column:].split()[0]) for line in lines[header + 1:header + 3]]
    assert shown == sorted(shown, reverse=True)
    logged = {a.path for a in mlflow_client.list_artifacts(parent.info.run_id, "compare")}
    assert logged == {"compare/compare.csv", "compare/compare.png"}


HEAD_ONLY = ["backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "trainer.epochs=2",
             "trainer.batch_size=8", "trainer.verbose=0", "freeze=all"]


def test_head_only_jobs_share_the_sweep_process_and_train_as_alone(cli, mlflow_client, tmp_path):
    # frozen backbone, cached features: the jobs run in the sweep's process (one backbone built, the cache
    # filled by the first job), and each trains exactly as the same config alone in a fresh process does
    write_shape_images(tmp_path / "images", ["circle", "square", "triangle"])
    result = cli("train", "-m", *HEAD_ONLY, *TINY_SHAPES, "head=linear,mlp", "optimizer.lr=1e-2,1e-3",
                 experiment="head_only_sweep", env={"FINETUNE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = assert_parent_and_children(mlflow_client, "head_only_sweep", 4)
    assert len({c.data.tags["finetune.process_id"] for c in children}) == 1, "head-only jobs in fresh processes"
    by_job = sorted(children, key=lambda c: int(c.data.tags["finetune.sweep_job"]))
    assert [c.data.tags["feature_cache"] for c in by_job] == ["miss", "hit", "hit", "hit"]
    # the sweep's own progress line after every job (plain lines: not a terminal)
    progress = [line for line in result.stdout.splitlines() if line.startswith("[sweep] ")]
    assert [line.split(" jobs done")[0] for line in progress] == [f"[sweep] {n}/4" for n in range(1, 5)], progress
    best = max(c.data.metrics["final_val_accuracy"] for c in children)
    assert f"best final_val_accuracy {best:.4f}" in progress[-1], progress[-1]
    best_id = parent.data.tags["best_run_id"]
    for child in by_job:  # every child holds its model: its head and backbone weights, and the best one the
        # whole image model too (assembled when the sweep ended; the others' when first loaded)
        logged = {a.path for a in mlflow_client.list_artifacts(child.info.run_id, "model")}
        assert {"model/head.keras", "model/backbone.weights.h5", "model/label_map.json"} <= logged, logged
        assert ("model/model.keras" in logged) == (child.info.run_id == best_id), (child.info.run_id, logged)
        assert [a.path for a in mlflow_client.list_artifacts(child.info.run_id, "backbone")] == [
            "backbone/backbone.weights.h5"]
    deferred = next(c for c in by_job if c.info.run_id != best_id)
    predicted = cli("predict", f"model={deferred.info.run_id}", f"images={tmp_path / 'images'}",
                    f"predict.output={tmp_path / 'deferred.csv'}", experiment="head_only_sweep")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "assembling" in predicted.stdout, predicted.stdout[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "deferred.csv")))
    assert len(rows) == 3 and all(abs(sum(float(v) for k, v in r.items() if k.startswith("prob_")) - 1) < 1e-4
                                  for r in rows), rows
    alone = cli("train", *HEAD_ONLY, *TINY_SHAPES, "head=mlp", "optimizer.lr=1e-3", experiment="head_only_alone",
                env={"FINETUNE_CACHE_DIR": str(tmp_path / "cache_alone")})
    assert alone.returncode == 0, alone.stderr[-3000:]
    [single] = runs_of(mlflow_client, "head_only_alone")
    [same] = [c for c in by_job if (c.data.params["head.name"], c.data.params["optimizer.lr"]) == ("mlp", "0.001")]
    assert same.data.tags["finetune.sweep_job"] == "3"  # the last job: after three others in that process
    # jobs 1 and 3 differ from the job before only in optimizer.lr: they reuse its head and traced steps
    assert result.stdout.count("head and traced train step reused") == 2, result.stdout[-3000:]
    compared = [m for m in single.data.metrics if m.startswith(("final_val_", "test_"))]
    assert "final_val_loss" in compared and "final_val_accuracy" in compared, compared
    for metric in compared:
        assert same.data.metrics[metric] == pytest.approx(single.data.metrics[metric], abs=1e-6), metric


def test_a_failing_job_never_leaves_the_parent_running(cli, mlflow_client):
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "freeze=last_n", "freeze.n=1,99",
                 "trainer.isolate_sweep_jobs=false",  # jobs in one process: isolated jobs are tested above
                 experiment="e2e_sweep_failing")
    assert result.returncode != 0
    runs = runs_of(mlflow_client, "e2e_sweep_failing")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("finetune.sweep") == "parent"]
    assert parent.info.status == "FAILED" and "freeze.n=99" in parent.data.tags["failed_job"]


def test_parallel_jobs_on_a_fresh_store(tmp_path, cli):
    """joblib runs 2 jobs at once (as many as the cores here); the MLflow store did not exist before (each
    job would otherwise race to create its tables). The parent callback creates it once, before the jobs
    start."""
    assert not (tmp_path / "mlflow.db").exists()
    result = cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, *TINY_SHAPES,
                 "optimizer.lr=1e-3,3e-2", "trainer.isolate_sweep_jobs=false",  # joblib's workers are processes already
                 experiment="parallel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "OperationalError" not in result.stderr, result.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = assert_parent_and_children(client, "parallel", 2)
    assert "JoblibLauncher" in parent.data.tags["launcher"]
    assert len({c.data.params["optimizer.lr"] for c in children}) == 2


def test_submitit_local_executor_sweep_lands_as_parent_and_children(cli, mlflow_client):
    """The submitit launcher (what hydra/launcher=slurm uses) with its local executor: the job runs in
    its own process started by submitit, and still lands under the sweep's parent run."""
    result = cli("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY,
                 *TINY_SHAPES, "optimizer.lr=1e-3", experiment="submitit_sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = assert_parent_and_children(mlflow_client, "submitit_sweep", 1)
    assert children[0].data.tags["finetune.process_id"] != parent.data.tags.get("finetune.process_id")
    assert "LocalLauncher" in parent.data.tags["launcher"]


def test_slurm_preset_composes(cli):
    result = cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout
    assert "partition: gpu" in result.stdout and "gpus_per_node: 1" in result.stdout
