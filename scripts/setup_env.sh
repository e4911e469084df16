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
if ! python -c "import finetune, pytest, xdist, tensorflow, mlflow, hydra" 2>/dev/null; then
  echo "installing finetune and its dependencies into .venv (TensorFlow is ~600 MB; 1-3 minutes)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e "$repo[dev]"
fi
