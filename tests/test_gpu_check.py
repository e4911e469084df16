"""scripts/gpu_check.sh --smoke: the GPU check's plumbing on a CPU (2 logical CPU devices for the mirrored
part, tiny sizes): both benchmarks run and the report holds both tables and GPU_RULES entries. The numbers
of a smoke run mean nothing; the real run is for a machine with GPUs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_writes_both_tables_and_the_rules(tmp_path, cache_dir):
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                            cwd=REPO, env=cli_env(cache_dir, {"PYTHON": sys.executable}), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    precision = json.loads((out / "precision.json").read_text())
    assert {(r["policy"], r["jit"]) for r in precision["rows"]} == {("float32", False), ("mixed_bfloat16", False)}
    assert all(r["images_per_s"] for r in precision["rows"])
    strategy = json.loads((out / "strategy.json").read_text())
    assert [(r["strategy"], r["replicas"]) for r in strategy["rows"]] == [("none", 1), ("mirrored", 2)]
    report = (out / "gpu_check.md").read_text()
    assert "| vgg16 | mirrored | 2 |" in report and 'GPU_RULES entries' in report and '"vgg": (' in report
