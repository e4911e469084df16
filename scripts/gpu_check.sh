#!/usr/bin/env bash
# The GPU check: one prepared run (<= 10 minutes) for a machine with one or more GPUs.
#
#   bash scripts/gpu_check.sh [--out DIR]        # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --smoke --out DIR  # on a CPU (the tests): tiny sizes, 2 logical CPU devices
#
# 1. precision and XLA: fp32 / mixed_float16 / mixed_bfloat16, jit_compile off/on, training steps of
#    ResNet50 and MobileNetV2 at 224 px (scripts/bench_precision.py -> DIR/precision.json)
# 2. one device against MirroredStrategy over every GPU present (scripts/bench_strategy.py ->
#    DIR/strategy.json)
# 3. DIR/gpu_check.md: both tables, for docs/benchmarks.md, and the GPU_RULES entries
#    (finetune/train/compute.py) that trainer.precision/jit_compile=auto would take from them.
# Python: $PYTHON, else .venv/bin/python, else python3 (TensorFlow must be installed: the GPU machine
# may have no network).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then
  export FINETUNE_LOGICAL_CPUS=2
  SIZE=32 BATCH=4 STEPS=1 BACKBONES=vgg16 JIT=--no-jit  # VGG16: the quickest to trace
else
  SIZE=224 BATCH=64 STEPS=20 BACKBONES=resnet50,mobilenet_v2 JIT=
  command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/gpus.txt" || echo "no nvidia-smi" | tee "$OUT/gpus.txt"
fi
start=$(date +%s)
echo "== 1/2 precision and XLA ($BACKBONES, ${SIZE} px, batch $BATCH)" >&2
"$PY" scripts/bench_precision.py --backbones "$BACKBONES" --size "$SIZE" --batch "$BATCH" --steps "$STEPS" \
  $JIT --out "$OUT/precision.json" > /dev/null
echo "== 2/2 one device against mirrored ($BACKBONES, batch $BATCH per replica)" >&2
"$PY" scripts/bench_strategy.py --backbones "$BACKBONES" --size "$SIZE" --batch "$BATCH" --steps "$STEPS" \
  --out "$OUT/strategy.json" > /dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

sys.path.insert(0, ".")
from finetune.model.backbones import BACKBONES

out = Path(sys.argv[1])
precision = json.loads((out / "precision.json").read_text())
strategy = json.loads((out / "strategy.json").read_text())
lines = [f"## GPU check: {precision['device']} {', '.join(precision['gpus']) or '(no GPU)'}, TensorFlow {precision['tf']}",
         "", f"Precision and XLA, whole-network training, {precision['size']} px, batch {precision['batch']}:", "",
         "| backbone | policy | jit | images/s | vs fp32 |", "|---|---|---|---|---|"]
best = {}
for row in precision["rows"]:
    rate = row["images_per_s"]
    lines.append(f"| {row['backbone']} | {row['policy']} | {row['jit']} | {rate if rate is not None else 'failed'} | "
                 f"{row.get('speedup_vs_fp32') or ''} |")
    if rate is not None and rate > best.get(row["backbone"], (0,))[0]:
        best[row["backbone"]] = (rate, row["policy"], row["jit"])
lines += ["", f"Mirrored ({strategy['devices']}), batch {strategy['batch_per_replica']} per replica:", "",
          "| backbone | strategy | replicas | images/s | vs one device |", "|---|---|---|---|---|"]
lines += [f"| {r['backbone']} | {r['strategy']} | {r['replicas']} | {r['images_per_s']} | {r['scaling_vs_one_device']} |"
          for r in strategy["rows"]]
policy = {"float32": "fp32", "mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
lines += ["", "GPU_RULES entries (finetune/train/compute.py), the fastest setting per family: "
          + ", ".join(f'"{BACKBONES[name].family}": ("{policy[p]}", {j})' for name, (_, p, j) in best.items()), ""]
(out / "gpu_check.md").write_text("\n".join(lines))
print("\n".join(lines))
PYEOF
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT (gpu_check.md, precision.json, strategy.json)" >&2
