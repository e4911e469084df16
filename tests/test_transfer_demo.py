"""scripts/transfer_demo.py end to end with --quick: source run -> saved backbone -> 4 target runs.

Checks the plumbing only (runs, MLflow records, equal budgets, the frozen backbone really unchanged);
the quick budget is far too small for the accuracies to mean anything, so none are compared.
The demo's `main` runs in this process; each of its five `python -m finetune train` calls is a child of
the warm interpreter the other CLI tests use (tests/warm_cli.py: the same entry point, argv, cwd and exit
status, without five TensorFlow imports), and its own subprocess runner is tested on its own.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "transfer_demo.py"
TARGET_RUNS = ("scratch", "frozen", "two_stage", "gradual")


def load_script():
    spec = importlib.util.spec_from_file_location("transfer_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def h5_arrays(path) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                      else None)
    return arrays


def test_png_folders_are_deterministic_and_the_target_kinds_unseen(tmp_path):
    demo = load_script()
    listing = []
    for attempt in range(2):
        paths = demo.write_png_folders(tmp_path, demo.SOURCE_KINDS[:3], demo.TARGET_KINDS, source_per_class=4,
                                       per_class=2, val_per_class=3, test_per_class=5, image_size=24, seed=3,
                                       textured=True)
        listing.append({name: sorted((p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*.png"))
                        for name, root in paths.items()})
    assert listing[0] == listing[1]
    files = {name: [f for f, _ in entries] for name, entries in listing[0].items()}
    assert sorted({f.split("/")[0] for f in files["source"]}) == sorted(demo.SOURCE_KINDS[:3])
    for split, n in (("target_train", 2), ("target_val", 3), ("target_test", 5)):
        assert sorted({f.split("/")[0] for f in files[split]}) == sorted(demo.TARGET_KINDS)
        assert len(files[split]) == n * len(demo.TARGET_KINDS)
    assert not set(demo.SOURCE_KINDS) & set(demo.TARGET_KINDS)
    names = [set(files[s]) for s in ("target_train", "target_val", "target_test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    with pytest.raises(SystemExit, match="both the source and the target"):
        demo.write_png_folders(tmp_path, ("heart", "circle"), demo.TARGET_KINDS, 1, 1, 1, 1, 24, 0, False)


def test_run_logged_writes_the_log_and_returns_status_and_lines(tmp_path, capsys):
    demo = load_script()
    log = tmp_path / "run.log"
    code, lines = demo.run_logged([sys.executable, "-c", "import sys; print('run id abc'); "
                                   "print('oops', file=sys.stderr); sys.exit(3)"],
                                  tmp_path, dict(os.environ), log, echo=True)
    assert code == 3 and lines == ["run id abc\n", "oops\n"]
    assert log.read_text().endswith("run id abc\noops\n")
    assert "   | run id abc" in capsys.readouterr().out


def test_quick_demo_records_five_runs_in_one_experiment(tmp_path, warm_cli, cache_dir, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.conftest import cli_env

    demo = load_script()
    work = tmp_path / "demo"
    commands = []

    def warm_run_logged(args, cwd, env, log, echo):
        assert args[:3] == [sys.executable, "-m", "finetune"]
        assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
        commands.append(args[3:])
        process = warm_cli.start(args[3:], None, cwd=cwd, env=cli_env(cache_dir))
        out, err = process.communicate(timeout=600)
        log.write_text(" ".join(args) + "\n\n" + out + err)
        return process.returncode, (out + err).splitlines(keepends=True)

    monkeypatch.setattr(demo, "run_logged", warm_run_logged)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        code = demo.main(["--quick", "--work", str(work)])
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        assert len(commands) == 5 and all(c[0] == "train" for c in commands)
        assert "[1/5] source" in out and "[5/5] target gradual" in out

        client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("transfer_demo")
        assert experiment is not None
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        assert set(runs) == {"source", *TARGET_RUNS}
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
        assert len({r.data.tags["transfer_demo"] for r in runs.values()}) == 1  # one invocation

        # the table: one row per approach, with its MLflow run id
        header = next(i for i, line in enumerate(out.splitlines()) if line.startswith("approach"))
        rows = {line.split()[0]: line for line in out.splitlines()[header + 2:header + 6]}
        assert set(rows) == set(TARGET_RUNS)
        for name in TARGET_RUNS:
            assert rows[name].split()[-1] == runs[name].info.run_id
        for column in ("lr", "trainable params", "val acc", "test acc", "wall s", "MLflow run id"):
            assert column in out.splitlines()[header]

        # equal budget: same data, backbone, input, seed, batch size, and epochs (two_stage: summed)
        params = {name: runs[name].data.params for name in TARGET_RUNS}
        for key in ("backbone", "input_shape", "data.path", "data.val_path", "data.test_path",
                    "trainer.seed", "trainer.batch_size", "train_size", "test_size"):
            assert len({params[name][key] for name in TARGET_RUNS}) == 1, key
        epochs = int(params["scratch"]["trainer.epochs"])
        assert int(params["frozen"]["trainer.epochs"]) == int(params["gradual"]["trainer.epochs"]) == epochs
        assert int(params["two_stage"]["stage1.epochs"]) + int(params["two_stage"]["stage2.epochs"]) == epochs
        assert runs["source"].data.params["trainer.seed"] != params["scratch"]["trainer.seed"]
        # each approach at its own rate: the range test ran in every target run, and the table shows it
        for name in TARGET_RUNS:
            found = float(params[name]["optimizer.lr_found"])
            assert 1e-7 <= found <= 1 and f"{found:.2g}" in rows[name]
        assert params["gradual"]["freeze.name"] == "gradual" and params["gradual"]["optimizer.layer_decay"] == "0.1"

        # where the backbones came from
        source_dir = (work / "runs" / "source").resolve()
        assert params["scratch"]["weights_source"] == "random"
        for name in ("frozen", "two_stage", "gradual"):
            assert params[name]["weights_source"].startswith(f"file:{source_dir / 'backbone.weights.h5'}")

        # frozen: only the head trained, and the backbone it saved is the source backbone, bit for bit
        frozen = params["frozen"]
        head = int(frozen["stage1.params_trainable"])
        num_features = 32  # hub:resnet_tiny (a KerasHub ResNet from config), the --quick backbone, pooled
        assert head == num_features * 5 + 5
        assert params["frozen"]["backbone.name"] == "hub" and "preset_resnet_tiny" in params["frozen"]["backbone.preset"]
        assert int(frozen["stage1.params_frozen"]) == int(frozen["params_total"]) - head
        assert int(params["scratch"]["stage1.params_trainable"]) > 100 * head
        assert int(params["two_stage"]["stage1.params_trainable"]) == head
        assert int(params["two_stage"]["stage2.params_trainable"]) > head
        assert int(params["gradual"]["stage1.params_trainable"]) == head
        source_weights = h5_arrays(source_dir / "backbone.weights.h5")
        frozen_weights = h5_arrays(work / "runs" / "frozen" / "backbone.weights.h5")
        assert source_weights.keys() == frozen_weights.keys() and source_weights
        assert all(np.array_equal(source_weights[k], frozen_weights[k]) for k in source_weights)
        tuned = h5_arrays(work / "runs" / "two_stage" / "backbone.weights.h5")
        assert not all(np.array_equal(source_weights[k], tuned[k]) for k in source_weights)
    finally:
        shutil.rmtree(work / "runs", ignore_errors=True)
