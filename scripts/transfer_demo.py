#!/usr/bin/env python
"""Transfer learning, demonstrated offline: source task -> saved backbone -> few-shot target task.

No ImageNet weights can be downloaded here, so the demo makes its own "pretrained" backbone:

1. SOURCE: MobileNetV2 (32 px, random init, everything trains) learns scikit-learn's digits 0-4.
   `finetune train` saves the trained backbone as <run dir>/backbone.weights.h5.
2. TARGET: digits 5-9 with only --per-class labelled images per class, trained three ways at the
   same budget (same epochs, data, backbone, input size, batch size and seed):
     scratch    backbone.weights=null  freeze=none
     frozen     backbone.weights=<source file>  freeze=all  (only the head trains)
     two_stage  backbone.weights=<source file>  experiment=two_stage
                (head with the backbone frozen, then the last blocks at a 10x lower learning rate;
                 the two stages' epochs add up to the same budget)

All four runs go through the real CLI (`python -m finetune train ...` in a subprocess) into one
MLflow experiment, and the script prints a comparison table read back from MLflow.

    python scripts/transfer_demo.py                       # the full demo (a few minutes on 2 CPU cores)
    python scripts/transfer_demo.py --quick               # tiny budget, checks the plumbing only
    python scripts/transfer_demo.py -- optimizer.lr=3e-3  # extra overrides for the three target runs

Exit status: 0 when every run finished, else the failing run's exit status.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


@dataclass
class Run:
    name: str
    overrides: list[str]
    run_id: str = ""
    output_dir: Path | None = None
    seconds: float = 0.0
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    status: str = ""


# ------------------------------------------------------------------------------------------- data
def write_png_folders(work: Path, per_class: int, val_per_class: int, seed: int,
                      source_per_class: int | None, test_per_class: int | None) -> dict[str, Path]:
    """Write the source and target sets as PNG class folders under <work>/data (rewritten each time).

    source/<c>/       digits 0-4: all of them (or `source_per_class` each)
    target_train/<c>/ digits 5-9: `per_class` each
    target_val/<c>/   digits 5-9: `val_per_class` each
    target_test/<c>/  digits 5-9: the rest (or `test_per_class` each)
    Images are the 8x8 digits scaled from 0..16 to 0..255 (as `data=digits` does); which image goes
    where is a seeded permutation per class, so the same seed writes the same folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target
    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    paths = {name: root / name for name in ("source", "target_train", "target_val", "target_test")}
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {name: 0 for name in paths}

    def save(split: str, cls: int, indices) -> None:
        folder = paths[split] / str(cls)
        folder.mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(images[i], mode="L").save(folder / f"{int(i):04d}.png")
        counts[split] += len(indices)

    for cls in SOURCE_CLASSES:
        idx = rng.permutation(np.flatnonzero(labels == cls))
        save("source", cls, idx if source_per_class is None else idx[:source_per_class])
    for cls in TARGET_CLASSES:
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < per_class + val_per_class + 1:
            raise SystemExit(f"error: --per-class {per_class} + --val-per-class {val_per_class} leaves no "
                             f"test images of digit {cls} ({len(idx)} in all)")
        save("target_train", cls, idx[:per_class])
        save("target_val", cls, idx[per_class:per_class + val_per_class])
        rest = idx[per_class + val_per_class:]
        save("target_test", cls, rest if test_per_class is None else rest[:test_per_class])
    print(f"data: {root}  source {counts['source']} images (digits 0-4); target digits 5-9: "
          f"train {counts['target_train']}, val {counts['target_val']}, test {counts['target_test']}",
          flush=True)
    return paths


# ------------------------------------------------------------------------------------------- runs
def run_logged(args: list[str], cwd: Path, env: dict, log: Path, echo: bool) -> tuple[int, list[str]]:
    """Run `args`, its stdout and stderr written to `log` as they come (and echoed if asked); returns the
    exit status and the lines."""
    with open(log, "w") as fh:
        fh.write(" ".join(args) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        lines = []
        for line in proc.stdout:
            fh.write(line)
            lines.append(line)
            if echo:
                print(f"   | {line}", end="", flush=True)
        return proc.wait(), lines


def train(run: Run, work: Path, common: list[str], log_dir: Path, echo: bool) -> None:
    """`python -m finetune train <common> <run.overrides>` in a subprocess; fills run_id/output_dir."""
    out = work / "runs" / run.name
    args = [sys.executable, "-m", "finetune", "train", *common, *run.overrides,
            f"tracking.run_name={run.name}", f"hydra.run.dir={out}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    log = log_dir / f"{run.name}.log"
    start = time.perf_counter()
    code, lines = run_logged(args, work, env, log, echo)
    run.seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(lines[-40:])
        print(f"\nerror: run '{run.name}' failed with exit status {code} (full log: {log})\n{tail}",
              file=sys.stderr, flush=True)
        raise SystemExit(code if code > 0 else 1)
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("run id "):
            run.run_id = stripped.split(None, 2)[2].strip()
        elif stripped.startswith("model ") and stripped.endswith("model.keras"):
            run.output_dir = Path(stripped.split(None, 1)[1].strip()).parent.parent
    if not run.run_id or run.output_dir is None:
        print(f"error: run '{run.name}' printed no run id / model path (log: {log})", file=sys.stderr)
        raise SystemExit(1)


def read_back(run: Run, client) -> None:
    record = client.get_run(run.run_id)
    run.params, run.metrics, run.status = record.data.params, record.data.metrics, record.info.status


def trainable(run: Run) -> str:
    counts = [run.params[key] for key in ("stage1.params_trainable", "stage2.params_trainable")
              if key in run.params]
    return " -> ".join(f"{int(c):,}" for c in counts)


def table(rows: list[Run]) -> str:
    header = ("approach", "trainable params", "val acc", "test acc", "wall s", "MLflow run id")
    body = [(r.name, trainable(r), f"{r.metrics.get('final_val_accuracy', float('nan')):.3f}",
             f"{r.metrics.get('test_accuracy', float('nan')):.3f}", f"{r.seconds:.0f}", r.run_id)
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("transfer_demo_data"),
                   help="folder for the data, run outputs, logs and (by default) the MLflow store "
                        "[./transfer_demo_data]")
    p.add_argument("--per-class", type=int, default=10, help="labelled target images per class [10]")
    p.add_argument("--val-per-class", type=int, default=20, help="target validation images per class [20]")
    p.add_argument("--source-epochs", type=int, default=8, help="epochs on the source task [8]")
    p.add_argument("--epochs", type=int, default=10,
                   help="target budget in epochs, the same for every approach; two_stage splits it "
                        "into head + fine-tune stages [10]")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="two_stage: epochs of its second (fine-tune) stage [half of --epochs]")
    p.add_argument("--finetune-blocks", type=int, default=2,
                   help="two_stage: trailing backbone blocks unfrozen in stage 2 [2]")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="target test images per class [all the rest: about 150]")
    p.add_argument("--batch-size", type=int, default=10,
                   help="batch size of the target runs [10: divides the 5 x --per-class training images "
                        "evenly, so no BatchNorm layer ever sees a batch of 2]")
    p.add_argument("--source-batch-size", type=int, default=32, help="batch size of the source run [32]")
    p.add_argument("--seed", type=int, default=0,
                   help="data selection, and the data and training seed of the target runs [0]")
    p.add_argument("--source-seed", type=int, default=None,
                   help="training seed of the source run [--seed + 1]. Must differ from --seed: with the "
                        "same seed the target head starts from the very weights the source head started "
                        "from, which the source features were trained to fit (see docs/transfer_demo.md)")
    p.add_argument("--backbone", default=None,
                   help="backbone for every run [mobilenet_v2; vgg16 with --quick]")
    p.add_argument("--input-size", type=int, default=32, help="input height = width in pixels [32]")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI [sqlite:///<work>/mlflow.db]")
    p.add_argument("--experiment", default="transfer_demo", help="MLflow experiment [transfer_demo]")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget (vgg16, which builds fastest; 60 source images per class, 1 source "
                        "epoch, 2 target epochs): checks that everything runs; the numbers mean nothing")
    p.add_argument("--verbose", action="store_true", help="echo every run's own output")
    p.add_argument("--source-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for the source run only (repeatable), e.g. head=mlp")
    p.add_argument("overrides", nargs="*",
                   help="extra Hydra overrides for the three target runs (after --), e.g. optimizer.lr=3e-3")
    args = p.parse_args(argv)
    if args.source_seed is None:
        args.source_seed = args.seed + 1
    if args.quick:
        args.source_epochs, args.epochs, args.val_per_class = 1, 2, min(args.val_per_class, 10)
        args.test_per_class = min(args.test_per_class or 20, 20)
    args.source_per_class = 60 if args.quick else None
    # Building the training graph of MobileNetV2's 155 layers takes ~40 s per run on 2 busy cores;
    # VGG16's 19 layers take a few seconds, which is what keeps --quick quick.
    args.backbone = args.backbone or ("vgg16" if args.quick else "mobilenet_v2")
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (two_stage needs an epoch per stage)")
    args.finetune_epochs = args.finetune_epochs or args.epochs // 2
    if not 1 <= args.finetune_epochs < args.epochs:
        p.error("--finetune-epochs must be between 1 and --epochs - 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    demo_id = uuid.uuid4().hex[:8]
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    began = time.perf_counter()
    data = write_png_folders(work, args.per_class, args.val_per_class, args.seed, args.source_per_class,
                             args.test_per_class)

    common = [f"backbone={args.backbone}", f"backbone.input_shape=[{args.input_size},{args.input_size}]",
              "data=folder", "trainer.verbose=2", f"tracking.uri={uri}", f"tracking.experiment={args.experiment}",
              f"+tracking.tags.transfer_demo={demo_id}"]
    if args.quick:
        common.append("tracking.log_model=false")  # the run dirs keep model.keras and backbone.weights.h5
    source = Run("source", ["backbone.weights=null", "freeze=none", f"data.path={data['source']}",
                            "data.val_split=0.2", f"data.seed={args.source_seed}",
                            f"trainer.seed={args.source_seed}", f"trainer.batch_size={args.source_batch_size}",
                            f"trainer.epochs={args.source_epochs}", *args.source_override])
    print(f"[1/4] source: {args.backbone} from random weights on digits 0-4, {args.source_epochs} "
          f"epoch(s), seed {args.source_seed} ...", flush=True)
    train(source, work, common, log_dir, args.verbose)
    backbone_file = source.output_dir / "backbone.weights.h5"
    if not backbone_file.is_file():
        print(f"error: the source run wrote no {backbone_file}", file=sys.stderr)
        return 1
    print(f"      done in {source.seconds:.0f} s, run {source.run_id}; backbone saved to {backbone_file}",
          flush=True)

    target = [f"data.path={data['target_train']}", f"data.val_path={data['target_val']}",
              f"data.test_path={data['target_test']}", f"data.seed={args.seed}", f"trainer.seed={args.seed}",
              f"trainer.batch_size={args.batch_size}", *args.overrides]
    head_epochs = args.epochs - args.finetune_epochs
    runs = [
        Run("scratch", ["backbone.weights=null", "freeze=none", f"trainer.epochs={args.epochs}", *target]),
        Run("frozen", [f"backbone.weights={backbone_file}", "freeze=all", f"trainer.epochs={args.epochs}",
                       *target]),
        Run("two_stage", [f"backbone.weights={backbone_file}", "experiment=two_stage",
                          f"trainer.stages.0.epochs={head_epochs}",
                          f"trainer.stages.1.epochs={args.finetune_epochs}",
                          f"trainer.stages.1.n={args.finetune_blocks}", *target]),
    ]
    describe = {"scratch": "random weights, everything trains",
                "frozen": "source backbone frozen, only the head trains",
                "two_stage": f"head {head_epochs} epoch(s), then last {args.finetune_blocks} blocks "
                             f"{args.finetune_epochs} epoch(s) at lr/10"}
    for number, run in enumerate(runs, start=2):
        print(f"[{number}/4] target {run.name}: {describe[run.name]}, {args.epochs} epochs on "
              f"{args.per_class} images per class ...", flush=True)
        train(run, work, common, log_dir, args.verbose)
        print(f"      done in {run.seconds:.0f} s, run {run.run_id}", flush=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run in (source, *runs):
        read_back(run, client)
    failed = [r.name for r in (source, *runs) if r.status != "FINISHED"]
    experiment = client.get_experiment_by_name(args.experiment)
    print(f"\nsource run: val acc {source.metrics.get('final_val_accuracy', float('nan')):.3f} on digits 0-4 "
          f"({args.source_epochs} epochs, seed {args.source_seed}, {source.seconds:.0f} s, run {source.run_id})")
    print(f"target: digits 5-9, {args.per_class} training images per class, {args.epochs} epochs each, "
          f"batch {args.batch_size}, seed {args.seed}, {args.backbone} at {args.input_size} px\n")
    print(table(runs))
    by_name = {r.name: r for r in runs}
    gain = by_name["frozen"].metrics.get("test_accuracy", 0) - by_name["scratch"].metrics.get("test_accuracy", 0)
    print(f"\nfrozen transfer vs scratch: {gain:+.3f} test accuracy")
    print(f"MLflow: experiment '{args.experiment}' (id {experiment.experiment_id}) in {uri}; "
          f"these runs carry the tag transfer_demo={demo_id}")
    print(f"  mlflow ui --host 127.0.0.1 --backend-store-uri {uri}")
    print(f"logs: {log_dir}   total wall time {time.perf_counter() - began:.0f} s")
    if failed:
        print(f"error: run(s) not FINISHED in MLflow: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
