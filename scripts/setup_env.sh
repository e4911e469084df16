#!/usr/bin/env bash
# Create .venv (if missing) and install finetune with its dev extra (if not installed yet).
# Sourced by scripts/quickstart.sh and scripts/test.sh; leaves the venv activated.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$repo/.venv/bin/python" ]; then
  echo "creating $repo/.venv"
  "$python" -m venv "$repo/.venv"
fi
# shellcheck disable=SC1091
. "$repo/.venv/bin/activate"
# FINETUNE_EXTRAS: the pyproject extras to install (scripts/test.sh asks for dev,hub,onnx,server: the suite
# tests KerasHub backbones, ONNX export and the team tracking server too); FINETUNE_IMPORTS: the modules whose absence means "install".
extras="${FINETUNE_EXTRAS:-dev}"
imports="${FINETUNE_IMPORTS:-finetune, pytest, xdist, tensorflow, mlflow, hydra}"
if ! python -c "import $imports" 2>/dev/null; then
  echo "installing finetune[$extras] and its dependencies into .venv (TensorFlow is ~600 MB; 1-3 minutes)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e "$repo[$extras]"
fi
