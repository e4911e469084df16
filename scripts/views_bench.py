#!/usr/bin/env python
"""Augmentation with a frozen backbone: K cached augmented views against augmenting afresh every epoch.

With the backbone frozen, `finetune train` trains the head on cached features; augmentation used to mean
giving that up (every epoch runs every image through the backbone again). `trainer.feature_cache_views=K`
caches K augmented views of each training image and draws one per epoch: K backbone passes instead of E.
This script measures what that costs in accuracy and saves in time, through the real CLI:

    none       freeze=all augment=none                      (cached features, no augmentation)
    per_epoch  freeze=all augment=<policy>                   (images through the backbone every epoch)
    views      freeze=all augment=<policy> trainer.feature_cache_views=K

Same data, backbone, epochs, batch size, learning rate and seeds. Every cached run starts from an empty
cache (trainer.feature_cache=refresh), so its time includes the extraction a first run pays.
Data: scikit-learn's bundled digits (`data=digits`: 1,797 images, 70/20/10 split) by default, or
generated shapes (--data shapes: --kinds, --per-class training images each, balanced val and test).
Backbone: VGG16 at 32 px, frozen, from random weights unless --weights names a file (no ImageNet here;
a frozen random network is still a fixed feature extractor, which is all this comparison needs).

    python scripts/views_bench.py                  # the comparison (about 6 minutes on 2 CPU cores)
    python scripts/views_bench.py --quick          # tiny budget: checks the plumbing only
    python scripts/views_bench.py --data shapes --weights transfer_demo_data/runs/source/backbone.weights.h5

Exit status: 0 when every run finished.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_demo import TARGET_KINDS, Run, read_back, train, write_png_folders  # noqa: E402  (shared plumbing)

CONFIGS = ("none", "per_epoch", "views")


def overrides(name: str, augment: str, views: int) -> list[str]:
    if name == "none":
        return ["augment=none", "trainer.feature_cache=refresh"]
    if name == "per_epoch":
        return [f"augment={augment}"]
    return [f"augment={augment}", f"trainer.feature_cache_views={views}", "trainer.feature_cache=refresh"]


def table(rows: dict[str, list[Run]], epochs: int, views: int) -> str:
    passes = {"none": 1, "per_epoch": epochs, "views": views}
    lines = ["| config | backbone passes per training image | val acc | test acc | wall s (whole process) |",
             "|---|---|---|---|---|"]
    for name, runs in rows.items():
        def mean(key):
            values = [r.metrics.get(key, float("nan")) for r in runs]
            return statistics.mean(values)
        seconds = statistics.mean(r.seconds for r in runs)
        lines.append(f"| {name} | {passes[name]} | {mean('final_val_accuracy'):.3f} | {mean('test_accuracy'):.3f} | "
                     f"{seconds:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("views_bench_data"), help="data, logs, MLflow store")
    p.add_argument("--weights", default=None,
                   help="backbone weights file (.weights.h5) to freeze [random weights: plumbing only]")
    p.add_argument("--backbone", default="vgg16", help="backbone [vgg16]")
    p.add_argument("--data", choices=("digits", "shapes"), default="digits", help="the data [digits]")
    p.add_argument("--kinds", type=lambda v: tuple(v.split(",")), default=TARGET_KINDS,
                   help=f"shape kinds [{','.join(TARGET_KINDS)}]")
    p.add_argument("--per-class", type=int, default=40, help="training images per kind [40]")
    p.add_argument("--eval-per-class", type=int, default=60, help="val and test images per kind [60]")
    p.add_argument("--image-size", type=int, default=64, help="PNG size [64]")
    p.add_argument("--input-size", type=int, default=32, help="model input size [32]")
    p.add_argument("--augment", default="light", help="augmentation policy [light]")
    p.add_argument("--views", type=int, default=4, help="K cached views [4]")
    p.add_argument("--epochs", type=int, default=16, help="epochs of every run [16]")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate [3e-3]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds [0 1]")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table (and .json beside it)")
    p.add_argument("--quick", action="store_true", help="tiny data, 2 epochs, vgg16: plumbing only")
    p.add_argument("--verbose", action="store_true", help="echo every run's own output")
    p.add_argument("extra", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.eval_per_class, args.epochs, args.seeds = 4, 2, 2, [0]
        args.views, args.image_size, args.batch_size, args.data = 2, 32, 10, "shapes"
    if args.views < 1:
        p.error("--views must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.expanduser().resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    began, bench_id = time.perf_counter(), uuid.uuid4().hex[:8]
    if args.data == "shapes":
        data = write_png_folders(work, (), args.kinds, 0, args.per_class, args.eval_per_class, args.eval_per_class,
                                 args.image_size, 0, False)
        source = ["data=folder", f"data.path={data['target_train']}", f"data.val_path={data['target_val']}",
                  f"data.test_path={data['target_test']}"]
    else:
        source = ["data=digits"]
    weights = f"backbone.weights={Path(args.weights).expanduser().resolve()}" if args.weights else "backbone.weights=null"
    common = [f"backbone={args.backbone}", weights, f"backbone.input_shape=[{args.input_size},{args.input_size}]",
              "freeze=all", *source, f"optimizer.lr={args.lr}", f"trainer.epochs={args.epochs}",
              f"trainer.batch_size={args.batch_size}", "trainer.verbose=2", "tracking.log_model=false",
              f"tracking.uri={uri}", "tracking.experiment=views_bench", f"+tracking.tags.views_bench={bench_id}",
              *args.extra]
    rows: dict[str, list[Run]] = {name: [] for name in CONFIGS}
    total, done = len(CONFIGS) * len(args.seeds), 0
    for seed in args.seeds:
        for name in CONFIGS:  # alternating, so that both sides see the same machine load
            done += 1
            run = Run(f"{name}_seed{seed}", [*overrides(name, args.augment, args.views), f"trainer.seed={seed}",
                                             f"data.seed={seed}"])
            print(f"[{done}/{total}] {run.name} ...", flush=True)
            train(run, work, common, work / "logs", args.verbose)
            print(f"      done in {run.seconds:.0f} s, run {run.run_id}", flush=True)
            rows[name].append(run)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for runs in rows.values():
        for run in runs:
            read_back(run, client)
    text = table(rows, args.epochs, args.views)
    print("\n" + text)
    data_text = "digits" if args.data == "digits" else f"{len(args.kinds)} kinds x {args.per_class} training images"
    print(f"\n{args.backbone} ({'weights ' + args.weights if args.weights else 'random weights'}), augment="
          f"{args.augment}, K={args.views}, {args.epochs} epochs, {data_text}, mean over seeds {args.seeds}")
    print(f"MLflow: experiment 'views_bench' in {uri}, tag views_bench={bench_id}; "
          f"{time.perf_counter() - began:.0f} s in all")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()},
             "runs": {name: [{"run_id": r.run_id, "metrics": r.metrics, "seconds": r.seconds} for r in runs]
                      for name, runs in rows.items()}}, indent=1))
    failed = [r.name for runs in rows.values() for r in runs if r.status != "FINISHED"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
