#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test (offline, ~N minutes on 2 cores).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh"
cd "$repo"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q --durations=15 "$@"
