#!/usr/bin/env bash
# The main job from a fresh clone: sets up .venv, then trains a real model offline with the quickstart
# preset (conf/experiment/quickstart.yaml: MobileNetV2 from random weights on scikit-learn's bundled
# handwritten digits) and logs it to ./mlflow.db. Extra args are Hydra overrides.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/scripts/setup_env.sh"
cd "$repo"
finetune train experiment=quickstart "$@"
