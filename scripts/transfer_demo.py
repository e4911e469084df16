#!/usr/bin/env python
"""Transfer learning, demonstrated offline: a rich source task -> saved backbone -> few-shot target task.

No ImageNet weights can be downloaded here, so the demo makes its own "pretrained" backbone:

1. SOURCE: a backbone from random weights (by default a small ResNet built from KerasHub's config,
   --backbone hub:resnet) learns to tell apart --source-kinds kinds of generated shape
   (finetune.data.shapes: random colours, sizes, positions, rotations, noisy gradient backgrounds,
   distractor lines; --textured adds two-colour fills). `finetune train` saves the trained backbone as
   <run dir>/backbone.weights.h5.
2. TARGET: --target-kinds kinds the source never saw, with only --per-class labelled images each, trained
   four ways at the same budget (epochs, data, backbone, input size, batch size, seed), each at its own
   learning rate from the range test (optimizer.lr=auto):
     scratch    backbone.weights=null  freeze=none
     frozen     backbone.weights=<source file>  freeze=all  (only the head trains)
     two_stage  backbone.weights=<source file>  experiment=two_stage
                (the head with the backbone frozen, then the last blocks at a 10x lower rate)
     gradual    backbone.weights=<source file>  freeze=gradual  (one more block every few epochs,
                block i from the top at lr x --layer-decay^i)

Every run goes through the real CLI (`python -m finetune train ...` in a subprocess) into one MLflow
experiment, and the script prints a comparison table read back from MLflow.

    python scripts/transfer_demo.py                       # the full demo (see docs/transfer_demo.md)
    python scripts/transfer_demo.py --quick               # tiny budget, checks the plumbing only
    python scripts/transfer_demo.py -- augment=light      # extra overrides for the four target runs

Exit status: 0 when every run finished, else the failing run's exit status.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # finetune.data.shapes draws the images (numpy + PIL, no TensorFlow)

# Visually distinct kinds for the source (near-twins such as circle/octagon/hexagon at 32 px would only
# slow its learning down) and five held-out kinds for the target, none of them in the source.
SOURCE_KINDS = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "line", "ellipse",
                "semicircle", "arc", "square_ring", "triangle_ring", "l_shape", "t_shape", "u_shape", "chevron",
                "two_dots", "teardrop", "diamond")
TARGET_KINDS = ("heart", "arrow", "pacman", "hourglass", "three_bars")
APPROACHES = ("scratch", "frozen", "two_stage", "gradual")


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
def write_png_folders(work: Path, source_kinds, target_kinds, source_per_class: int, per_class: int,
                      val_per_class: int, test_per_class: int, image_size: int, seed: int,
                      textured: bool) -> dict[str, Path]:
    """Write the source and target sets as PNG class folders under <work>/data (rewritten each time).

    source/<kind>/        source_per_class images of each source kind (the run holds out 10% itself)
    target_train/<kind>/  per_class images of each target kind
    target_val/<kind>/    val_per_class each
    target_test/<kind>/   test_per_class each
    Image i of a kind is finetune.data.shapes.render(kind, i, image_size, seed): the target splits take
    disjoint index ranges, and the same seed writes the same folders."""
    from PIL import Image

    from finetune.data.shapes import render

    overlap = set(source_kinds) & set(target_kinds)
    if overlap:
        raise SystemExit(f"error: kinds in both the source and the target: {sorted(overlap)}")
    root = work / "data"
    if root.exists():
        shutil.rmtree(root)
    paths = {name: root / name for name in ("source", "target_train", "target_val", "target_test")}
    counts = {name: 0 for name in paths}

    def save(split: str, kind: str, indices) -> None:
        folder = paths[split] / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(render(kind, i, image_size, seed, textured)).save(folder / f"{kind}_{i:05d}.png")
        counts[split] += len(indices)

    for kind in source_kinds:
        save("source", kind, range(source_per_class))
    for kind in target_kinds:
        save("target_train", kind, range(per_class))
        save("target_val", kind, range(per_class, per_class + val_per_class))
        save("target_test", kind, range(per_class + val_per_class, per_class + val_per_class + test_per_class))
    print(f"data: {root} ({image_size} px{', textured' if textured else ''}): source {counts['source']} images of "
          f"{len(source_kinds)} kinds; target {len(target_kinds)} unseen kinds: train {counts['target_train']}, "
          f"val {counts['target_val']}, test {counts['target_test']}", flush=True)
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
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           "PYTHONUNBUFFERED": "1"}  # the log (and --verbose) follow the run as it goes, epoch by epoch
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
    counts = [run.params[key] for key in sorted(run.params) if key.startswith("stage")
              and key.endswith(".params_trainable")]
    counts = sorted({int(c) for c in counts}) if run.name == "gradual" else [int(c) for c in counts]
    if run.name == "gradual" and len(counts) > 2:
        counts = [counts[0], counts[-1]]
    return " -> ".join(f"{c:,}" for c in counts)


def learning_rate(run: Run) -> str:
    found = run.params.get("optimizer.lr_found")
    return f"{float(found):.2g}" if found else f"{float(run.params.get('optimizer.lr', 'nan')):.2g}"


def table(rows: list[Run]) -> str:
    header = ("approach", "lr", "trainable params", "val acc", "test acc", "wall s", "MLflow run id")
    body = [(r.name, learning_rate(r), trainable(r), f"{r.metrics.get('final_val_accuracy', float('nan')):.3f}",
             f"{r.metrics.get('test_accuracy', float('nan')):.3f}", f"{r.seconds:.0f}", r.run_id)
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def backbone_overrides(backbone: str, work: Path) -> list[str]:
    """backbone=<name>, or for hub:<family> a KerasHub preset folder written once (random weights from its
    config, by scripts/hub_preset.py) and backbone=hub backbone.preset=<folder>."""
    if not backbone.startswith("hub:"):
        return [f"backbone={backbone}"]
    family = backbone.split(":", 1)[1]
    folder = work / f"preset_{family}"
    if not (folder / "config.json").is_file():
        spec = importlib.util.spec_from_file_location("hub_preset", Path(__file__).resolve().parent / "hub_preset.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_preset(family, folder)
    return ["backbone=hub", f"backbone.preset={folder}"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("transfer_demo_data"),
                   help="folder for the data, run outputs, logs and (by default) the MLflow store "
                        "[./transfer_demo_data]")
    p.add_argument("--source-kinds", type=lambda v: tuple(v.split(",")), default=SOURCE_KINDS,
                   help=f"comma-separated shape kinds of the source task [{len(SOURCE_KINDS)} kinds]")
    p.add_argument("--target-kinds", type=lambda v: tuple(v.split(",")), default=TARGET_KINDS,
                   help=f"comma-separated kinds of the target task, none in the source [{','.join(TARGET_KINDS)}]")
    p.add_argument("--source-per-class", type=int, default=300, help="source images per kind [300]")
    p.add_argument("--per-class", type=int, default=10, help="labelled target images per kind [10]")
    p.add_argument("--val-per-class", type=int, default=10, help="target validation images per kind [10]")
    p.add_argument("--test-per-class", type=int, default=100, help="target test images per kind [100]")
    p.add_argument("--image-size", type=int, default=64, help="size of the generated PNGs [64]")
    p.add_argument("--textured", action="store_true", help="two-colour texture fills (a harder source)")
    p.add_argument("--source-epochs", type=int, default=25, help="epochs on the source task [25]")
    p.add_argument("--source-lr", default="5e-4",
                   help="source learning rate (cosine schedule after 1 warmup epoch), or auto [5e-4]")
    p.add_argument("--epochs", type=int, default=30,
                   help="target budget in epochs, the same for every approach; two_stage splits it into "
                        "head + fine-tune stages [30]")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="two_stage: epochs of its second (fine-tune) stage [half of --epochs]")
    p.add_argument("--finetune-blocks", type=int, default=2,
                   help="two_stage: trailing backbone blocks unfrozen in stage 2 [2]")
    p.add_argument("--unfreeze-every", type=int, default=None,
                   help="gradual: epochs between unfreezes [--epochs // 5]")
    p.add_argument("--unfreeze-max", type=int, default=4, help="gradual: at most this many blocks [4]")
    p.add_argument("--layer-decay", type=float, default=0.1,
                   help="gradual: block i from the top trains at lr x this^i (like two_stage's lr/10 for the "
                        "blocks it unfreezes; the range test runs on the head alone) [0.1]")
    p.add_argument("--batch-size", type=int, default=10,
                   help="batch size of the target runs [10: divides the 5 x --per-class training images "
                        "evenly, so no BatchNorm layer ever sees a batch of 2]")
    p.add_argument("--source-batch-size", type=int, default=32, help="batch size of the source run [32]")
    p.add_argument("--seed", type=int, default=0,
                   help="the images, and the data and training seed of the target runs [0]")
    p.add_argument("--source-seed", type=int, default=None,
                   help="training seed of the source run [--seed + 1]. Must differ from --seed: with the "
                        "same seed the target head starts from the very weights the source head started "
                        "from, which the source features were trained to fit (see docs/transfer_demo.md)")
    p.add_argument("--backbone", default=None,
                   help="backbone for every run: a registry name, or hub:<family> for a small KerasHub backbone "
                        "built from its config (scripts/hub_preset.py --list) [hub:resnet; hub:resnet_tiny with --quick]")
    p.add_argument("--input-size", type=int, default=32, help="model input height = width in pixels [32]")
    p.add_argument("--lr-find-steps", type=int, default=60, help="range-test steps of each target run [60]")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI [sqlite:///<work>/mlflow.db]")
    p.add_argument("--experiment", default="transfer_demo", help="MLflow experiment [transfer_demo]")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget (hub:resnet_tiny; 4 source kinds x 30 images, 1 source epoch, "
                        "2 target epochs): checks that everything runs; the numbers mean nothing")
    p.add_argument("--verbose", action="store_true", help="echo every run's own output")
    p.add_argument("--source-backbone", type=Path, default=None,
                   help="reuse this source backbone (a run's backbone.weights.h5, same --backbone and "
                        "--input-size) instead of training the source again")
    p.add_argument("--source-override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for the source run only (repeatable), e.g. head=mlp")
    p.add_argument("overrides", nargs="*",
                   help="extra Hydra overrides for the four target runs (after --), e.g. augment=light")
    args = p.parse_args(argv)
    if args.source_seed is None:
        args.source_seed = args.seed + 1
    if args.quick:
        args.source_kinds = args.source_kinds[:4]
        args.source_per_class, args.source_epochs, args.epochs = 30, 1, 2
        args.val_per_class, args.test_per_class, args.image_size = 4, 6, 32
        args.lr_find_steps = 10
    # A small ResNet built from KerasHub's config (scripts/hub_preset.py): of the registry backbones none
    # learned the source within the budget (docs/transfer_demo.md); this one does, at ~6 s an epoch.
    args.backbone = args.backbone or ("hub:resnet_tiny" if args.quick else "hub:resnet")
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (two_stage needs an epoch per stage)")
    args.finetune_epochs = args.finetune_epochs or args.epochs // 2
    if not 1 <= args.finetune_epochs < args.epochs:
        p.error("--finetune-epochs must be between 1 and --epochs - 1")
    args.unfreeze_every = args.unfreeze_every or max(1, args.epochs // 5)
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
    data = write_png_folders(work, args.source_kinds, args.target_kinds, args.source_per_class, args.per_class,
                             args.val_per_class, args.test_per_class, args.image_size, args.seed, args.textured)

    common = [*backbone_overrides(args.backbone, work), f"backbone.input_shape=[{args.input_size},{args.input_size}]",
              "data=folder", "trainer.verbose=2", f"tracking.uri={uri}", f"tracking.experiment={args.experiment}",
              f"+tracking.tags.transfer_demo={demo_id}"]
    if args.quick:
        common.append("tracking.log_model=false")  # the run dirs keep model.keras and backbone.weights.h5
    total = 1 + len(APPROACHES)
    source = Run("source", ["backbone.weights=null", "freeze=none", f"data.path={data['source']}",
                            "data.val_split=0.1", f"data.seed={args.source_seed}", f"trainer.seed={args.source_seed}",
                            f"trainer.batch_size={args.source_batch_size}", f"trainer.epochs={args.source_epochs}",
                            "schedule=cosine", f"schedule.warmup_epochs={min(1, args.source_epochs - 1)}",
                            f"optimizer.lr={args.source_lr}", f"trainer.lr_find_steps={max(args.lr_find_steps, 60)}",
                            *args.source_override])
    if args.source_backbone:
        backbone_file = args.source_backbone.expanduser().resolve()
        if not backbone_file.is_file():
            print(f"error: --source-backbone {backbone_file} does not exist", file=sys.stderr)
            return 1
        source = None
        print(f"[1/{total}] source: reusing {backbone_file}", flush=True)
    else:
        print(f"[1/{total}] source: {args.backbone} from random weights on {len(args.source_kinds)} shape kinds, "
              f"{args.source_epochs} epoch(s), lr {args.source_lr}, seed {args.source_seed} ...", flush=True)
        train(source, work, common, log_dir, args.verbose)
        backbone_file = source.output_dir / "backbone.weights.h5"
        if not backbone_file.is_file():
            print(f"error: the source run wrote no {backbone_file}", file=sys.stderr)
            return 1
        print(f"      done in {source.seconds:.0f} s, run {source.run_id}; backbone saved to {backbone_file}",
              flush=True)

    target = [f"data.path={data['target_train']}", f"data.val_path={data['target_val']}",
              f"data.test_path={data['target_test']}", f"data.seed={args.seed}", f"trainer.seed={args.seed}",
              f"trainer.batch_size={args.batch_size}", "optimizer.lr=auto",
              f"trainer.lr_find_steps={args.lr_find_steps}", *args.overrides]
    head_epochs = args.epochs - args.finetune_epochs
    weights = f"backbone.weights={backbone_file}"
    runs = [
        Run("scratch", ["backbone.weights=null", "freeze=none", f"trainer.epochs={args.epochs}", *target]),
        Run("frozen", [weights, "freeze=all", f"trainer.epochs={args.epochs}", *target]),
        Run("two_stage", [weights, "experiment=two_stage", f"trainer.stages.0.epochs={head_epochs}",
                          f"trainer.stages.1.epochs={args.finetune_epochs}",
                          f"trainer.stages.1.n={args.finetune_blocks}", *target]),
        Run("gradual", [weights, "freeze=gradual", f"freeze.every={args.unfreeze_every}",
                        f"freeze.max_blocks={args.unfreeze_max}", f"optimizer.layer_decay={args.layer_decay}",
                        f"trainer.epochs={args.epochs}", *target]),
    ]
    describe = {"scratch": "random weights, everything trains",
                "frozen": "source backbone frozen, only the head trains",
                "two_stage": f"head {head_epochs} epoch(s), then last {args.finetune_blocks} blocks "
                             f"{args.finetune_epochs} epoch(s) at lr/10",
                "gradual": f"head first, one more block every {args.unfreeze_every} epoch(s), "
                           f"at most {args.unfreeze_max}, block i from the top at lr x {args.layer_decay}^i"}
    for number, run in enumerate(runs, start=2):
        print(f"[{number}/{total}] target {run.name}: {describe[run.name]}, {args.epochs} epochs on "
              f"{args.per_class} images per kind, lr from the range test ...", flush=True)
        train(run, work, common, log_dir, args.verbose)
        print(f"      done in {run.seconds:.0f} s, run {run.run_id}", flush=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    everything = [run for run in (source, *runs) if run is not None]
    for run in everything:
        read_back(run, client)
    failed = [r.name for r in everything if r.status != "FINISHED"]
    experiment = client.get_experiment_by_name(args.experiment)
    if source is None:
        print(f"\nsource: {backbone_file} (reused)")
    else:
        print(f"\nsource run: val acc {source.metrics.get('final_val_accuracy', float('nan')):.3f} on "
              f"{len(args.source_kinds)} kinds ({args.source_epochs} epochs, seed {args.source_seed}, "
              f"{source.seconds:.0f} s, run {source.run_id})")
    print(f"target: {len(args.target_kinds)} unseen kinds ({', '.join(args.target_kinds)}), {args.per_class} "
          f"training images each, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, "
          f"{args.backbone} at {args.input_size} px\n")
    print(table(runs))
    by_name = {r.name: r for r in runs}
    scratch = by_name["scratch"].metrics.get("test_accuracy", 0.0)
    best = max(runs[1:], key=lambda r: r.metrics.get("test_accuracy", 0.0))
    print(f"\nbest transfer ({best.name}) vs scratch: {best.metrics.get('test_accuracy', 0.0) - scratch:+.3f} "
          f"test accuracy")
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
