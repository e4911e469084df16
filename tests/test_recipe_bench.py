"""scripts/recipe_bench.py --quick end to end: the plain and the recipe run on the same imbalanced digits.

Checks the plumbing and that the comparison is fair (same data, epochs, seed, backbone; only the recipe
differs); the quick budget is far too small for the numbers to mean anything. The script's `main` runs
here, its `python -m finetune train` calls forked from the warm interpreter (tests/warm_cli.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "recipe_bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("recipe_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_imbalanced_digit_folders_are_10_to_1_and_disjoint(tmp_path):
    bench = load_script()
    folders = bench.write_folders(tmp_path, major=50, eval_per_class=20, seed=0)
    counts = {split: {d.name: len(list(d.glob("*.png"))) for d in folder.iterdir()} for split, folder in folders.items()}
    assert counts["train"] == {**{c: 50 for c in bench.MAJOR}, **{c: 5 for c in bench.MINOR}}
    assert set(counts["val"].values()) == set(counts["test"].values()) == {20}
    names = [{p.name for p in folder.rglob("*.png")} for folder in folders.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_quick_bench_compares_plain_and_recipe_at_equal_budget(tmp_path, warm_cli, cache_dir, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    bench = load_script()
    runner = sys.modules["transfer_demo"]  # the run plumbing the bench shares with the transfer demo

    def warm_run_logged(args, cwd, env, log, echo):
        process = warm_cli.start(args[3:], None, cwd=cwd, env=cli_env(cache_dir))
        out, err = process.communicate(timeout=600)
        log.write_text(out + err)
        return process.returncode, (out + err).splitlines(keepends=True)

    monkeypatch.setattr(runner, "run_logged", warm_run_logged)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, out = tmp_path / "bench", tmp_path / "bench.md"
    assert bench.main(["--quick", "--work", str(work), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recipe - plain (mean over 1 seed(s))" in printed
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recipe_bench")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"plain_seed0", "recipe_seed0"} and {r.info.status for r in runs.values()} == {"FINISHED"}
    plain, recipe = runs["plain_seed0"].data.params, runs["recipe_seed0"].data.params
    for key in ("backbone", "input_shape", "data.path", "data.test_path", "trainer.epochs", "trainer.seed",
                "trainer.batch_size", "optimizer.lr"):
        assert plain[key] == recipe[key], key
    assert (plain["schedule.name"], plain["augment.name"], plain["trainer.class_weight"]) == ("constant", "flip", "none")
    assert (recipe["schedule.name"], recipe["augment.name"], recipe["trainer.class_weight"]) == (
        "constant", "flip", "balanced")
    assert float(recipe["schedule.warmup_epochs"]) == 1.0 and float(plain["schedule.warmup_epochs"]) == 0.0
    assert float(recipe["loss.label_smoothing"]) == 0.1
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["means"]) == {"plain", "recipe"} and set(report["gain"]) == {
        "test_accuracy", "macro_f1", "minority_recall"}
    assert "| **recipe** | mean |" in out.read_text()


def test_views_bench_sides_differ_only_in_augmentation_and_cache():
    """scripts/views_bench.py: the three sides share every override but these; cached sides start empty."""
    spec = importlib.util.spec_from_file_location("views_bench", REPO / "scripts" / "views_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.overrides("none", "light", 4) == ["augment=none", "trainer.feature_cache=refresh"]
    assert module.overrides("per_epoch", "light", 4) == ["augment=light"]
    assert module.overrides("views", "strong", 3) == ["augment=strong", "trainer.feature_cache_views=3",
                                                      "trainer.feature_cache=refresh"]
    runs = {name: [module.Run(name, [], seconds=s, metrics={"final_val_accuracy": a, "test_accuracy": a})
                   for s, a in ((10, 0.5), (20, 0.7))] for name in module.CONFIGS}
    table = module.table(runs, epochs=16, views=4).splitlines()
    assert table[2:] == ["| none | 1 | 0.600 | 0.600 | 15 |", "| per_epoch | 16 | 0.600 | 0.600 | 15 |",
                         "| views | 4 | 0.600 | 0.600 | 15 |"]
