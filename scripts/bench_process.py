#!/usr/bin/env python
"""finetune against the plain Keras script as whole processes: what a user waits for, start-up included.

    python scripts/bench_process.py                          # all cases, 2 repetitions (optuna32: 1)
                                                             #   -> docs/benchmarks_process.md + .json
    python scripts/bench_process.py --cases sweep8 --repeats 3 --out /tmp/process.md
    python scripts/bench_process.py --smoke --out /tmp/p.md  # tiny sizes: checks the plumbing only

scripts/bench.py times both sides inside one process (neither pays Python/TensorFlow start-up). This
script runs every side as its own command under /usr/bin/time (wall seconds, peak RSS), as a user would:
  * finetune: `python -m finetune train [-m] ...` (the real CLI: Hydra, the MLflow parent/child runs,
    sweep jobs as the CLI runs them), an SQLite MLflow store that exists already (created by an untimed
    warm-up command, as for any user's second command), `tracking.log_model` as configured (true).
  * plain: scripts/plain_keras.py, the Keras guide's script: image_dataset_from_directory, then per trial
    clear_session, MobileNetV2 (frozen, training=False) + head, compile, fit. No feature caching.
Both sides: the same JPEG class folders (generated shapes, 5 classes, written once, split 80/20 per class
into train/ and val/ folders; finetune reads them with data=folder data.path=train data.val_path=val),
MobileNetV2 with random weights (backbone.weights=null: nothing can be downloaded here; same speed as
ImageNet) at 128 px, batch 32, Adam. Each repetition runs both sides, alternating which goes first.

Cases (the targets of issue 14):
  sweep8    8 trials (head linear|mlp x 4 learning rates), 300 images, 5 epochs: `finetune train -m`, a cold
            feature cache. Target plain/finetune >= 4.
  optuna32  32 trials of `-m hparams_search=head_optuna hydra.sweeper.n_trials=32`, 1,000 images, 5 epochs,
            a cold cache; the plain script trains 32 trials (linear|mlp alternating, 16 learning rates): its
            time per trial does not depend on the head. Target >= 10.
  single20  one 20-epoch frozen run on 1,000 images: finetune with a cold cache, then again with the cache
            the cold run filled (warm); plain once per repetition. Targets >= 6 cold, >= 8 warm.
For the sweeps, the per-trial numbers come from the sweep's MLflow child runs: a trial's wall time (run
start to end), its head's training (the epochs, from the per-epoch metric timestamps: the median gap
between epochs times the number of epochs) and what is left beyond it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PLAIN = REPO / "scripts" / "plain_keras.py"
CLASSES = ("circle", "square", "triangle", "star", "cross")
LRS_8 = (1e-2, 3e-3, 1e-3, 3e-4)


@dataclass(frozen=True)
class Sizes:
    small: int = 300      # images of sweep8
    large: int = 1000     # images of optuna32 and single20
    px: int = 128
    sweep_epochs: int = 5
    optuna_trials: int = 32
    single_epochs: int = 20


FULL, SMOKE = Sizes(), Sizes(small=30, large=30, px=32, sweep_epochs=1, optuna_trials=2, single_epochs=2)


def progress(message: str) -> None:
    print(f"[bench_process {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_images(folder: Path, count: int, px_source: int = 160) -> tuple[Path, Path]:
    """`count` JPEGs in 5 class folders, split 80/20 per class into folder/train and folder/val."""
    from PIL import Image

    from finetune.data.shapes import render

    train, val = folder / "train", folder / "val"
    if (folder / "done").is_file():
        return train, val
    per_class = count // len(CLASSES)
    for name in CLASSES:
        for i in range(per_class):
            split = train if i < int(per_class * 0.8) else val
            (split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(name, i, px_source, 7, textured=True)).save(split / name / f"{i:04d}.jpg",
                                                                              quality=90)
    (folder / "done").write_text("")
    return train, val


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `command` under /usr/bin/time; its wall seconds and peak RSS (MiB). Output goes to `log`."""
    cwd.mkdir(parents=True, exist_ok=True)
    stats = log.with_suffix(".time")
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *command], cwd=cwd, env=env,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    wall, rss_kb = stats.read_text().split()[-2:]
    return {"seconds": float(wall), "peak_rss_mb": round(int(rss_kb) / 1024, 1)}


class Bench:
    def __init__(self, work: Path, sizes: Sizes):
        self.work, self.sizes, self.counter = work, sizes, 0
        self.store = work / "mlflow.db"
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{self.store}"}

    def fresh(self, kind: str) -> Path:
        self.counter += 1
        return self.work / kind / f"{self.counter:04d}"

    def finetune(self, args: list[str], cache: Path, experiment: str) -> dict:
        cwd = self.fresh("runs")
        env = {**self.env, "FINETUNE_CACHE_DIR": str(cache)}
        result = timed([PYTHON, "-m", "finetune", "train", *args, f"tracking.experiment={experiment}"], cwd, env,
                       cwd.with_suffix(".log"))
        shutil.rmtree(cwd, ignore_errors=True)  # run folders: the MLflow store keeps what is measured
        return result

    def plain(self, train: Path, val: Path, epochs: int, trials: list[tuple[str, float]]) -> dict:
        cwd = self.fresh("plain")
        spec = ",".join(f"{head}:{lr:g}" for head, lr in trials)
        return timed([PYTHON, str(PLAIN), "--train", str(train), "--val", str(val), "--px", str(self.sizes.px),
                      "--epochs", str(epochs), "--trials", spec], cwd, self.env, cwd.with_suffix(".log"))

    def common(self, train: Path, val: Path) -> list[str]:
        return ["backbone=mobilenet_v2", "backbone.weights=null", f"backbone.input_shape=[{self.sizes.px},{self.sizes.px}]",
                "data=folder", f"data.path={train}", f"data.val_path={val}", "trainer.batch_size=32", "freeze=all"]

    def trial_numbers(self, experiment: str) -> dict:
        """From the sweep's child runs: median trial wall time, head training time and what is left."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.store}")
        exp = client.get_experiment_by_name(experiment)
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("finetune.sweep") == "child"]
        walls, heads = [], []
        for run in runs:
            walls.append((run.info.end_time - run.info.start_time) / 1000)
            stamps = sorted(m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "loss"))
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            heads.append(statistics.median(gaps) * len(stamps) if gaps else 0.0)
        trial, head = statistics.median(walls), statistics.median(heads)
        return {"trials": len(runs), "trial_s": round(trial, 2), "head_training_s": round(head, 2),
                "overhead_per_trial_s": round(trial - head, 2), "trials_total_s": round(sum(walls), 1),
                "processes": len({r.data.tags.get("finetune.process_id") for r in runs}),
                "feature_cache": sorted({r.data.tags.get("feature_cache", "-") for r in runs})}


def alternate(rep: int, first, second) -> tuple[dict, dict]:
    """Both sides of one repetition, alternating which goes first."""
    if rep % 2 == 0:
        a = first()
        return a, second()
    b = second()
    return first(), b


def sweep_samples(bench: Bench, case: str, folder: Path, count: int, trials: list, sweep_args, repeats: int) -> dict:
    """Both sides of a sweep case, `repeats` times: plain trains `trials`; finetune runs `-m` with
    sweep_args(rep), a cold cache each time; plus the per-trial numbers of its child runs."""
    s = bench.sizes
    train, val = write_images(folder, count)
    samples = {"plain": [], "finetune": [], "trials": []}
    for rep in range(repeats):
        experiment = f"{case}_{rep}"
        args = ["-m", *bench.common(train, val), f"trainer.epochs={s.sweep_epochs}", *sweep_args(rep)]
        plain, tuned = alternate(rep, lambda: bench.plain(train, val, s.sweep_epochs, trials),
                                 lambda: bench.finetune(args, bench.fresh("cache"), experiment))
        samples["plain"].append(plain)
        samples["finetune"].append(tuned)
        samples["trials"].append(bench.trial_numbers(experiment))
        progress(f"{case} rep {rep}: plain {plain['seconds']:.1f} s, finetune {tuned['seconds']:.1f} s")
    return samples


def case_sweep8(bench: Bench, repeats: int) -> dict:
    s = bench.sizes
    trials = [(head, lr) for head in ("linear", "mlp") for lr in LRS_8]
    samples = sweep_samples(bench, "sweep8", bench.work / "images_small", s.small, trials,
                            lambda rep: ["head=linear,mlp", "optimizer.lr=" + ",".join(f"{lr:g}" for lr in LRS_8)],
                            repeats)
    return summary(f"8-trial sweep, {s.small} images, {s.px} px, {s.sweep_epochs} epochs", samples, 4)


def case_optuna32(bench: Bench, repeats: int) -> dict:
    s = bench.sizes
    lrs = [10 ** (-4 + 2 * i / 15) for i in range(16)]
    trials = [("linear" if i % 2 == 0 else "mlp", lrs[i % 16]) for i in range(s.optuna_trials)]
    samples = sweep_samples(bench, "optuna32", bench.work / "images_large", s.large, trials,
                            lambda rep: ["hparams_search=head_optuna", f"hydra.sweeper.n_trials={s.optuna_trials}",
                                         f"hydra.sweeper.study_name=bench{rep}"], repeats)
    return summary(f"{s.optuna_trials}-trial Optuna head sweep, {s.large} images, {s.px} px, {s.sweep_epochs} epochs",
                   samples, 10)


def case_single20(bench: Bench, repeats: int) -> list[dict]:
    s = bench.sizes
    train, val = write_images(bench.work / "images_large", s.large)
    args = [*bench.common(train, val), f"trainer.epochs={s.single_epochs}", "head=linear", "optimizer.lr=1e-3"]
    samples = {"plain": [], "cold": [], "warm": []}
    for rep in range(repeats):
        cache = bench.fresh("cache")

        def finetune_cold_then_warm():
            cold = bench.finetune(args, cache, f"single20_{rep}")
            return {"cold": cold, "warm": bench.finetune(args, cache, f"single20_{rep}")}

        plain, tuned = alternate(rep, lambda: bench.plain(train, val, s.single_epochs, [("linear", 1e-3)]),
                                 finetune_cold_then_warm)
        samples["plain"].append(plain)
        samples["cold"].append(tuned["cold"])
        samples["warm"].append(tuned["warm"])
        progress(f"single20 rep {rep}: plain {plain['seconds']:.1f} s, finetune cold {tuned['cold']['seconds']:.1f} s, "
                 f"warm {tuned['warm']['seconds']:.1f} s")
    name = f"one {s.single_epochs}-epoch frozen run, {s.large} images, {s.px} px"
    return [summary(f"{name}, cold cache", {"plain": samples["plain"], "finetune": samples["cold"]}, 6),
            summary(f"{name}, warm cache", {"plain": samples["plain"], "finetune": samples["warm"]}, 8)]


def summary(case: str, samples: dict, target: float) -> dict:
    plain = statistics.median(s["seconds"] for s in samples["plain"])
    tuned = statistics.median(s["seconds"] for s in samples["finetune"])
    entry = {"case": case, "plain_s": plain, "finetune_s": tuned, "ratio": round(plain / tuned, 2),
             "target": f"plain/finetune >= {target:g}", "target_met": plain / tuned >= target,
             "plain_peak_rss_mb": max(s["peak_rss_mb"] for s in samples["plain"]),
             "finetune_peak_rss_mb": max(s["peak_rss_mb"] for s in samples["finetune"]),
             "samples": samples}
    if samples.get("trials"):
        entry["trials"] = samples["trials"][-1]
    return entry


def machine() -> dict:
    import keras
    import tensorflow as tf

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "commit": commit.stdout.strip() or None}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# finetune vs the plain Keras script, as whole processes", "",
             f"Generated by `python scripts/bench_process.py{' --smoke' if report['smoke'] else ''} --cases "
             f"{','.join(report['cases'])} --repeats {report['repeats']} --once {report['once']}` on {m['date']}, {m['cores']} CPU core(s), "
             f"no GPU, Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}, finetune "
             f"{m['commit']}" + (" (**smoke: tiny sizes, the numbers mean nothing**)" if report["smoke"] else "") + ".",
             "", "```", __doc__.split("\n\n", 2)[2].rstrip(), "```", "",
             "| case | plain s | finetune s | plain/finetune | target | met | peak RSS MiB plain / finetune |",
             "|---|---|---|---|---|---|---|"]
    for e in report["entries"]:
        lines.append(f"| {e['case']} | {e['plain_s']:.1f} | {e['finetune_s']:.1f} | {e['ratio']:.2f} | {e['target']} | "
                     f"{'yes' if e['target_met'] else 'no'} | {e['plain_peak_rss_mb']:.0f} / {e['finetune_peak_rss_mb']:.0f} |")
    lines += ["", "Per trial (the last repetition's sweep, from its MLflow child runs):", "",
              "| case | trials | processes | trial s (median) | head training s | left beyond it s | feature cache |",
              "|---|---|---|---|---|---|---|"]
    for e in report["entries"]:
        if "trials" in e:
            t = e["trials"]
            lines.append(f"| {e['case']} | {t['trials']} | {t['processes']} | {t['trial_s']:.2f} | "
                         f"{t['head_training_s']:.2f} | {t['overhead_per_trial_s']:.2f} | {', '.join(t['feature_cache'])} |")
    lines += ["", "Each repetition (seconds): " + "; ".join(
        f"{e['case']}: plain {[s['seconds'] for s in e['samples']['plain']]}, finetune "
        f"{[s['seconds'] for s in e['samples']['finetune']]}" for e in report["entries"]), ""]
    return "\n".join(lines)


CASES = {"sweep8": case_sweep8, "optuna32": case_optuna32, "single20": case_single20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--once", default="optuna32",
                        help="cases measured in one repetition only (optuna32's plain side takes ~25 min here)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks_process.md")
    parser.add_argument("--work", type=Path, default=None, help="keep the images and store here (default: temp)")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected some of {', '.join(CASES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-bench-process-"))
    bench = Bench(work, SMOKE if args.smoke else FULL)
    progress("warm-up (untimed): the MLflow store, the file caches")
    write_images(work / "images_small", bench.sizes.small)
    bench.finetune([*bench.common(*write_images(work / "images_small", bench.sizes.small)), "trainer.epochs=1"],
                   bench.fresh("cache"), "warm_up")
    bench.plain(*write_images(work / "images_small", bench.sizes.small), 1, [("linear", 1e-3)])
    entries = []
    for case in cases:
        progress(f"case {case}")
        result = CASES[case](bench, 1 if case in args.once.split(",") else args.repeats)
        entries += result if isinstance(result, list) else [result]
    report = {"smoke": args.smoke, "cases": cases, "repeats": args.repeats, "once": args.once, "machine": machine(),
              "entries": entries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    args.out.write_text(markdown(report))
    print(markdown(report))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
