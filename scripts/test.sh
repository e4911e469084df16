#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test (offline; about 13 minutes on 2 idle
# cores, measured on a fresh clone; it needs about 9 GB of free disk: 3.5 for the venv, 5.3 at the peak in
# /tmp). Over the 10-minute budget since the team-server tests, which start PostgreSQL and MLflow servers,
# take about 5 minutes of one worker, and the tf.distribute tests about 2.5. Test files are spread
# over 2 worker processes (pytest-xdist, one file per worker at a time, so module fixtures stay shared);
# extra arguments go to pytest, e.g. `-m "not slow"` (the fast tier: no CLI), `-n 0` (one process),
# `--cov` (line coverage of finetune/, CLI subprocesses included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FINETUNE_EXTRAS="dev,hub,onnx,server"
export FINETUNE_IMPORTS="finetune, pytest, xdist, tensorflow, mlflow, hydra, keras_hub, tf2onnx, onnxruntime, flask_wtf, psycopg2"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh"
cd "$repo"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
