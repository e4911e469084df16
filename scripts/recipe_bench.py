#!/usr/bin/env python
"""The fine-tuning recipe against the plain default, on imbalanced data, through the real CLI.

Data (offline, bundled): scikit-learn's handwritten digits as PNG folders, imbalanced 10:1 in training
(--major images for each of the digits 0-4, --major / 10 for each of 5-9), with balanced validation and
test sets (--eval-per-class each), so that minority recall is measured on as many images as majority
recall. (The generated shapes do not do: deep backbones from random weights barely learn them in this
budget; the digits they learn.) The backbone starts from random weights (no ImageNet offline).
`--data shapes` is the second set: ten generated kinds the transfer demo's source never saw, 10:1 the same
way, to start from that demo's source backbone: `-- backbone.weights=<runs/source/backbone.weights.h5>`.

Two configurations, each on --seeds seeds at the same epochs, backbone, input size and batch size:
    plain   the defaults: constant learning rate, flip augmentation
    recipe  experiment=recipe (warmup + cosine, light augmentation, balanced class weights, smoothing 0.1)
Reported from MLflow: test accuracy, macro-F1 and minority-class recall (mean over the minority classes),
per seed and the mean over seeds.

    python scripts/recipe_bench.py                 # the full comparison (~8 minutes on 2 CPU cores)
    python scripts/recipe_bench.py --quick         # tiny budget: checks the plumbing only
    python scripts/recipe_bench.py --out docs/recipe_bench.md

Exit status: 0 when every run finished.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_demo import Run, read_back, train  # noqa: E402  (the same run plumbing)

MAJOR = ("0", "1", "2", "3", "4")
MINOR = ("5", "6", "7", "8", "9")
# --data shapes: ten generated kinds, none of them in the transfer demo's source task, so that its source
# backbone (-- backbone.weights=<file>) can serve as a pretrained start
SHAPE_MAJOR = ("heart", "arrow", "pacman", "hourglass", "three_bars")
SHAPE_MINOR = ("rectangle", "trapezoid", "star4", "gear", "parallelogram")
CONFIGS = {"plain": ["augment=flip"], "recipe": ["experiment=recipe"]}


def write_folders(work: Path, major: int, eval_per_class: int, seed: int) -> dict[str, Path]:
    """train/ (imbalanced 10:1), val/ and test/ (balanced) PNG class folders of scikit-learn's digits under
    <work>/data: a seeded permutation of each class's images, 8x8 scaled to 0..255 (as data=digits)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    minor = max(1, major // 10)
    rng = np.random.default_rng(seed)
    for cls in (*MAJOR, *MINOR):
        index = rng.permutation(np.flatnonzero(digits.target == int(cls)))
        n_train = major if cls in MAJOR else minor
        if len(index) < n_train + 2 * eval_per_class:
            raise SystemExit(f"error: digit {cls} has {len(index)} images, fewer than --major + 2 x --eval-per-class")
        parts = {"train": index[:n_train], "val": index[n_train:n_train + eval_per_class],
                 "test": index[n_train + eval_per_class:n_train + 2 * eval_per_class]}
        for split, chosen in parts.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in chosen:
                Image.fromarray(images[i], mode="L").save(folder / f"{int(i):04d}.png")
    print(f"data: {root}  train {5 * major + 5 * minor} images ({major} per digit 0-4, {minor} per digit 5-9), "
          f"val and test {eval_per_class} per digit", flush=True)
    return {split: root / split for split in ("train", "val", "test")}


def write_shape_folders(work: Path, major: int, eval_per_class: int, image_size: int = 64) -> dict[str, Path]:
    """The same layout from generated shapes: --major images of each SHAPE_MAJOR kind, a tenth of that of
    each SHAPE_MINOR kind, and eval_per_class of each in val and test (disjoint image indices)."""
    from PIL import Image

    from finetune.data.shapes import render

    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    minor = max(1, major // 10)
    for kind in (*SHAPE_MAJOR, *SHAPE_MINOR):
        n_train = major if kind in SHAPE_MAJOR else minor
        ranges = {"train": range(n_train), "val": range(n_train, n_train + eval_per_class),
                  "test": range(n_train + eval_per_class, n_train + 2 * eval_per_class)}
        for split, indices in ranges.items():
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in indices:
                Image.fromarray(render(kind, i, image_size, 0)).save(folder / f"{kind}_{i:04d}.png")
    print(f"data: {root}  train {5 * major + 5 * minor} shapes ({major} per kind of {', '.join(SHAPE_MAJOR)}; "
          f"{minor} per kind of {', '.join(SHAPE_MINOR)}), val and test {eval_per_class} per kind", flush=True)
    return {split: root / split for split in ("train", "val", "test")}


def minority_recall(metrics: dict, minor=None) -> float:
    minor = minor or (SHAPE_MINOR if any(f"test_recall_{c}" in metrics for c in SHAPE_MINOR) else MINOR)
    return statistics.mean(metrics.get(f"test_recall_{c}", float("nan")) for c in minor)


def summary(rows: dict[str, list[Run]]) -> tuple[str, dict]:
    header = "| config | seed | test accuracy | macro-F1 | minority recall | wall s | MLflow run |\n|---|---|---|---|---|---|---|"
    lines, means = [header], {}
    for name, runs in rows.items():
        for run in runs:
            m = run.metrics
            lines.append(f"| {name} | {run.params.get('trainer.seed', '?')} | {m.get('test_accuracy', float('nan')):.3f} "
                         f"| {m.get('test_macro_f1', float('nan')):.3f} | {minority_recall(m):.3f} "
                         f"| {run.seconds:.0f} | `{run.run_id[:8]}` |")
        means[name] = {key: statistics.mean(values) for key, values in {
            "test_accuracy": [r.metrics.get("test_accuracy", float("nan")) for r in runs],
            "macro_f1": [r.metrics.get("test_macro_f1", float("nan")) for r in runs],
            "minority_recall": [minority_recall(r.metrics) for r in runs]}.items()}
    for name, mean in means.items():
        lines.append(f"| **{name}** | mean | **{mean['test_accuracy']:.3f}** | **{mean['macro_f1']:.3f}** "
                     f"| **{mean['minority_recall']:.3f}** | | |")
    return "\n".join(lines), means


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("recipe_bench_data"), help="data, runs, logs, MLflow store")
    p.add_argument("--data", choices=("digits", "shapes"), default="digits",
                   help="digits (bundled) or shapes (generated kinds the transfer demo's source never saw) [digits]")
    p.add_argument("--major", type=int, default=100, help="training images per digit 0-4 [100]; 5-9: a tenth")
    p.add_argument("--eval-per-class", type=int, default=30, help="val and test images per digit [30]")
    p.add_argument("--size", type=int, default=32, help="input size in pixels [32]")
    p.add_argument("--epochs", type=int, default=10, help="epochs, the same for both configs [10]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds [0 1 2]")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone, from random weights, all of it trains "
                                                              "[mobilenet_v2, as experiment=quickstart]")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of both configs [1e-3]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="which sides to run [plain recipe]")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for the recipe side only (repeatable), e.g. augment=flip")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table (and .json beside it)")
    p.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, tiny data: plumbing only")
    p.add_argument("--verbose", action="store_true", help="echo every run's own output")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    if args.quick:
        args.major, args.eval_per_class, args.epochs, args.seeds, args.batch_size = 10, 4, 2, [0], 8
        args.backbone = "vgg16"  # builds in seconds
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.expanduser().resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    began, bench_id = time.perf_counter(), uuid.uuid4().hex[:8]
    data = (write_folders(work, args.major, args.eval_per_class, seed=0) if args.data == "digits"
            else write_shape_folders(work, args.major, args.eval_per_class))
    common = [f"backbone={args.backbone}", "backbone.weights=null", f"backbone.input_shape=[{args.size},{args.size}]",
              "freeze=none", "data=folder", f"data.path={data['train']}", f"data.val_path={data['val']}",
              f"data.test_path={data['test']}", f"optimizer.lr={args.lr}", f"trainer.epochs={args.epochs}",
              f"trainer.batch_size={args.batch_size}", "trainer.verbose=2", "tracking.log_model=false",
              f"tracking.uri={uri}", "tracking.experiment=recipe_bench", f"+tracking.tags.recipe_bench={bench_id}",
              *args.overrides]
    rows: dict[str, list[Run]] = {name: [] for name in args.configs}
    total, done = len(args.configs) * len(args.seeds), 0
    for seed in args.seeds:
        for name in args.configs:
            overrides = CONFIGS[name]
            done += 1
            extra = args.recipe if name == "recipe" else []
            run = Run(f"{name}_seed{seed}", [*overrides, *extra, f"trainer.seed={seed}", f"data.seed={seed}"])
            print(f"[{done}/{total}] {run.name} ...", flush=True)
            train(run, work, common, work / "logs", args.verbose)
            print(f"      done in {run.seconds:.0f} s, run {run.run_id}", flush=True)
            rows[name].append(run)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for runs in rows.values():
        for run in runs:
            read_back(run, client)
    table, means = summary(rows)
    print("\n" + table)
    gain = {}
    if set(means) == set(CONFIGS):
        gain = {key: means["recipe"][key] - means["plain"][key] for key in means["plain"]}
        print(f"\nrecipe - plain (mean over {len(args.seeds)} seed(s)): test accuracy {gain['test_accuracy']:+.3f}, "
              f"macro-F1 {gain['macro_f1']:+.3f}, minority recall {gain['minority_recall']:+.3f}")
    print(f"MLflow: experiment 'recipe_bench' in {uri}, tag recipe_bench={bench_id}; "
          f"{time.perf_counter() - began:.0f} s in all")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "means": means, "gain": gain,
             "runs": {name: [{"run_id": r.run_id, "metrics": r.metrics, "seconds": r.seconds} for r in runs]
                      for name, runs in rows.items()}}, indent=1))
    failed = [r.name for runs in rows.values() for r in runs if r.status != "FINISHED"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
