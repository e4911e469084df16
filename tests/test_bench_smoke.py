"""scripts/bench.py --smoke end to end: every row runs both sides and the report (JSON + Markdown) is whole.

Tiny sizes: checks the plumbing only, never the speed (the numbers of a smoke run mean nothing)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "bench.py"
TIMED_ROWS = ("1", "2", "3", "4")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, warm_cli):
    """`python scripts/bench.py --smoke`, forked from the warm interpreter (tests/warm_cli.py) that has
    TensorFlow imported already: the script runs as __main__ with its argv, cwd and environment."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.md"
    process = warm_cli.start(["--smoke", "--out", str(out)], None, cwd=tmp, env=cli_env(tmp / "cache"),
                             script=SCRIPT)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return {"json": json.loads(out.with_suffix(".json").read_text()), "markdown": out.read_text(),
            "stderr": stderr}


def test_every_row_has_both_sides_timed_and_a_ratio(smoke_report):
    report = smoke_report["json"]
    assert report["smoke"] is True and sorted(report["rows"]) == ["1", "2", "3", "4", "5", "6"]
    for row in TIMED_ROWS:
        entries = report["rows"][row]
        assert entries, f"row {row} is empty"
        for entry in entries:
            assert entry["plain_s"] > 0 and entry["finetune_s"] > 0, (row, entry)
            assert entry["ratio"] > 0 and entry["ratio_kind"] in ("plain/finetune", "finetune/plain"), (row, entry)
            assert entry["plain_peak_rss_mb"] >= 0 and entry["finetune_peak_rss_mb"] >= 0, (row, entry)
    assert report["rows"]["1"][0]["backbone_pass_s"] > 0 and report["rows"]["1"][0]["finetune_backbone_passes"] > 0
    assert len(report["rows"]["2"][0]["finetune_trial_s"]) == 2
    tuned = report["rows"]["3"][0]
    assert tuned["plain_gflops"] > 0 and tuned["finetune_gflops"] > 0 and tuned["train_flops"] > tuned["forward_flops"]
    assert report["rows"]["4"][0]["plain_images_per_s"] > 0 and report["rows"]["4"][0]["finetune_images_per_s"] > 0
    memory = report["rows"]["5"]
    assert len(memory) == sum(len(report["rows"][row]) for row in TIMED_ROWS)
    assert all(e["plain_peak_rss_mb"] >= 0 and e["finetune_peak_rss_mb"] >= 0 for e in memory)
    assert report["fp32_peak"]["peak_gflops"] > 0
    stall = report["rows"]["6"][0]
    for side in ("plain", "finetune"):
        assert stall[f"{side}_step_s"] > 0 and stall[f"{side}_efficiency"] > 0, stall
        assert stall[f"{side}_pipeline_images_per_s"] > 0, stall
    assert stall["finetune_pipeline_uncached_images_per_s"] > 0, stall


def test_markdown_names_the_machine_and_has_every_table(smoke_report):
    text = smoke_report["markdown"]
    machine = smoke_report["json"]["machine"]
    assert machine["tensorflow"] in text and machine["keras"] in text and "CPU:" in text
    assert "## How each number is measured" in text
    for number in range(1, 6):
        assert f"\n## {number}. " in text, f"no table for row {number}"
    header = next(line for line in text.splitlines() if line.startswith("| case | plain s | finetune s"))
    assert "plain/finetune" in header
    assert text.count("|---|") >= 5
    assert "row 2" in smoke_report["stderr"] and "finetune, repetition 1/1" in smoke_report["stderr"]
