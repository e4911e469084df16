"""Resident memory of each job of a 6-job sweep, with jobs in one process and in a fresh process each.

    python scripts/bench_sweep_memory.py [--jobs 6] [--out docs/sweep_memory.json] [extra overrides...]

Runs `finetune train -m` twice through the real CLI in a temporary folder (tiny MobileNetV2 on the
generated shapes data; add overrides to change that), once with `trainer.isolate_sweep_jobs=false`
(Hydra's basic launcher runs every job in the sweep's process) and once with `true` (each job in a
fresh process, the default), and prints the `process_rss_mb` each job's MLflow run recorded at its
end, plus the wall time of each sweep. Writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["backbone=mobilenet_v2", "backbone.weights=null", "backbone.input_shape=[32,32]", "trainer.epochs=1",
        "trainer.batch_size=16", "trainer.verbose=0", "data=shapes", "data.num_per_class=8",
        "data.image_size=32", "data.classes=[circle,square,triangle]"]
LRS = ["1e-3", "2e-3", "3e-3", "5e-3", "1e-2", "2e-2", "3e-2", "5e-2"]


def sweep_rss(workdir: Path, isolate: bool, jobs: int, extra: list[str]) -> dict:
    experiment = f"memory_isolate_{str(isolate).lower()}"
    args = [sys.executable, "-m", "finetune", "train", "-m", *TINY, *extra, f"optimizer.lr={','.join(LRS[:jobs])}",
            f"trainer.isolate_sweep_jobs={str(isolate).lower()}", f"tracking.experiment={experiment}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    print(f"[bench] isolate_sweep_jobs={isolate}: {jobs} jobs ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"sweep failed:\n{done.stderr[-3000:]}")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("finetune.sweep") == "child"]
    children.sort(key=lambda r: int(r.data.tags["sweep_job"]))
    rss = [round(r.data.metrics["process_rss_mb"], 1) for r in children]
    return {"isolate_sweep_jobs": isolate, "jobs": jobs, "rss_mb": rss, "growth_mb": round(rss[-1] - rss[0], 1),
            "growth_per_job_mb": round((rss[-1] - rss[0]) / max(1, len(rss) - 1), 1), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, choices=range(2, len(LRS) + 1))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="extra finetune overrides, e.g. freeze=none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        results = [sweep_rss(Path(tmp), isolate, args.jobs, args.overrides) for isolate in (False, True)]
    print(f"\n{'isolate_sweep_jobs':<20}{'RSS per job (MB)':<52}{'growth/job':>11}{'wall s':>8}")
    for r in results:
        print(f"{str(r['isolate_sweep_jobs']):<20}{' '.join(f'{x:.0f}' for x in r['rss_mb']):<52}"
              f"{r['growth_per_job_mb']:>11.1f}{r['wall_s']:>8.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"overrides": TINY + args.overrides, "results": results}, indent=2))
        print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
