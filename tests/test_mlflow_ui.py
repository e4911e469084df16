"""The MLflow UI, in a real headless browser, shows a finished sweep: parent run, child runs, their metrics.

A sweep is run through the real CLI into the session's store, `mlflow ui` serves that store on a free
loopback port, and Debian's Chromium (/usr/bin/chromium) opens the experiment's runs page. Every
assertion reads the page as rendered (DOM text after MLflow's JavaScript ran), so a blank page, an error
page or MLflow 3's GenAI view of the experiment fails it. A screenshot is kept as a test artifact:
`test-artifacts/mlflow_ui_runs.png` (FINETUNE_TEST_ARTIFACTS names another folder).

Driver: the PyPI package `playwright` (dev extra), driving Debian's Chromium through
`executable_path`; it never downloads a browser of its own (`playwright install` is not used and could
not work offline). It waits for the page with timeouts (no blind sleeps) and can click, which this test
needs: MLflow 3 shows child runs collapsed under their parent and shows no metric column until one is
picked in "Columns". Chromium's own `--dump-dom` could do neither.

No Chromium (and scripts/install_browser.sh could not install it) or no playwright: skipped, except
under CI (`CI` set), where that fails.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, TINY_SHAPES, runs_of

pytestmark = pytest.mark.slow

EXPERIMENT = "ui_sweep"
CHROMIUM = Path("/usr/bin/chromium")
# What works here: as root (--no-sandbox), without a GPU, on a closed network (no background requests).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Wide enough that MLflow's runs grid (which renders only the columns in view) shows the metric columns.
VIEWPORT = {"width": 2000, "height": 700}
SERVER_START_TIMEOUT_S = 60
PAGE_TIMEOUT_MS = 30_000
METRICS = {"parent": ["best_final_val_accuracy"], "child": ["final_val_accuracy", "test_accuracy"]}
PARAM = "optimizer.lr"
# The runs page's title: "Training runs" while the UI's "GenAI | Model training" switch is on GenAI, its
# default in a fresh browser profile as here; "Runs" when it is on Model training.
RUNS_HEADING = re.compile(r"^(Training runs|Runs)$")


def artifacts_dir() -> Path:
    return Path(os.environ.get("FINETUNE_TEST_ARTIFACTS") or REPO / "test-artifacts")


def _unavailable(reason: str):
    """Skip, but fail under CI, where the browser test must run."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium; installed by scripts/install_browser.sh when missing (as root, with apt-get)."""
    if not CHROMIUM.exists():
        try:
            done = subprocess.run(["bash", str(REPO / "scripts" / "install_browser.sh")],
                                  capture_output=True, text=True, timeout=900)
            why = (done.stderr or done.stdout).strip()[-1500:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
        if not CHROMIUM.exists():
            _unavailable(f"no {CHROMIUM}, and scripts/install_browser.sh could not install it: {why}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the Python package playwright is missing: pip install -e '.[dev]'")
    return CHROMIUM


@pytest.fixture(scope="module")
def sweep(cli, mlflow_client) -> dict:
    """A finished 2-job grid sweep in its own experiment: {"experiment_id", "parent", "children"}."""
    # jobs in the sweep's own process: quicker, and this path is covered too
    result = cli("train", "-m", *TINY, *TINY_SHAPES, "optimizer.lr=1e-3,1e-2", "trainer.isolate_sweep_jobs=false",
                 experiment=EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(mlflow_client, EXPERIMENT)
    (parent,) = [r for r in runs if r.data.tags.get("finetune.sweep") == "parent"]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert len(runs) == 3 and len(children) == 2, [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.info.run_name.startswith("sweep ")
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    # finetune marks its experiments as machine-learning ones, not GenAI ones (MLflow 3's experiment kind).
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development", exp.tags
    return {"experiment_id": exp.experiment_id, "parent": parent, "children": children}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> list[int]:
    """SIGTERM the whole process group (mlflow, uvicorn and its workers), SIGKILL what outlives
    grace_s, reap the leader. Returns the pids still alive at the end (none, normally)."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group's id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not _group_members(pgid):
                return []
            time.sleep(0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    return _group_members(pgid)


def _tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


@pytest.fixture(scope="module")
def mlflow_ui(store, tmp_path_factory):
    """`mlflow ui` on the session's store, on a free loopback port; yields its base URL."""
    logs = tmp_path_factory.mktemp("mlflow_ui")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # No background job runner (7 Huey consumer processes): the runs pages don't use it, and the
           # server starts in half the time.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode} before answering on {base}; "
                            f"its stderr ends:\n{_tail(logs / 'stderr.log')}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not answer on {base}/health within {SERVER_START_TIMEOUT_S} s; "
                            f"its stderr ends:\n{_tail(logs / 'stderr.log')}", pytrace=False)
            time.sleep(0.25)
        yield base
    finally:
        left = _stop_group(proc)
        assert not left, f"mlflow ui processes still running after SIGKILL: {left}"


def _check_runs_page(page, sweep: dict) -> None:
    from playwright.sync_api import expect

    parent, children = sweep["parent"], sweep["children"]

    def row(run):  # MLflow's runs grid (AG Grid) keys each row by run id
        return page.locator(f'[role="row"][row-id="{run.info.run_id}"]')

    def cell(run, col_id: str):
        return row(run).locator(f'[role="gridcell"][col-id="{col_id}"]')

    def name_cell(run):
        return cell(run, "attributes.`Run Name`")

    # The experiment's runs view (MLflow 3's GenAI views - Overview, Traces, ... - have neither heading nor grid).
    expect(page.get_by_role("heading", name=RUNS_HEADING)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^\s*3 matching runs\s*$"))).to_be_visible()

    # The parent run, by name, linking to its run page.
    expect(name_cell(parent)).to_contain_text(parent.info.run_name)
    expect(name_cell(parent).locator(f'a[href$="/runs/{parent.info.run_id}"]')).to_be_visible()

    # MLflow shows child runs collapsed under their parent: expand the parent (the button in its name cell).
    if not row(children[0]).is_visible():
        name_cell(parent).locator("button").first.click()
    for child in children:
        expect(name_cell(child)).to_contain_text(child.info.run_name)
        expect(name_cell(child).locator(f'a[href$="/runs/{child.info.run_id}"]')).to_be_visible()

    # MLflow 3 shows no metric column by default: pick the metrics (and the swept parameter) in "Columns".
    # The column list is a virtual list (only the entries in view exist): find each through its search box.
    page.get_by_role("button", name="Columns").click()
    tree = page.get_by_test_id("column-selector-tree")
    search = page.get_by_placeholder("Search columns")
    for name in [*METRICS["parent"], *METRICS["child"], PARAM]:
        search.fill(name)
        # The entry whose whole text is the name (the search highlights the match, splitting the text up).
        tree.locator("span").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")).first.click()
    search.fill("")
    page.keyboard.press("Escape")
    expect(tree).to_be_hidden()

    shown = {"parent": [parent], "child": children}
    for kind, names in METRICS.items():
        for name in names:
            col = f"metrics.`{name}`"
            expect(page.locator(f'[role="columnheader"][col-id="{col}"]')).to_have_text(name)
            for run in shown[kind]:
                value = cell(run, col)
                expect(value).to_have_text(re.compile(r"^\s*-?\d+(\.\d+)?(e-?\d+)?\s*$"))  # a number, not "-"
                assert float(value.inner_text()) == pytest.approx(run.data.metrics[name], abs=1e-3), (
                    f"{name} of run {run.info.run_name!r} as shown")
    expect(page.locator(f'[role="columnheader"][col-id="params.`{PARAM}`"]')).to_have_text(PARAM)
    for child in children:
        expect(cell(child, f"params.`{PARAM}`")).to_have_text(child.data.params[PARAM])


def test_mlflow_ui_shows_the_sweep_with_its_child_runs_and_metrics(chromium, sweep, mlflow_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    url = f"{mlflow_ui}/#/experiments/{sweep['experiment_id']}/runs"
    shot = artifacts_dir() / "mlflow_ui_runs.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        shot.unlink()  # never pass on an older run's picture
    with sync_playwright() as pw:
        # A fresh, empty profile (--user-data-dir) under pytest's tmp_path.
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(chromium), args=CHROMIUM_ARGS,
            headless=True, viewport=VIEWPORT)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url)
            # MLflow opens its assistant panel on a first visit; close it to leave the grid the width.
            with contextlib.suppress(Exception):
                page.get_by_role("heading", name=RUNS_HEADING).wait_for()
                page.get_by_role("button", name="Close", exact=True).click(timeout=2_000)
            try:
                _check_runs_page(page, sweep)
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shot), full_page=True)  # what the page showed when it failed
                raise
            page.screenshot(path=str(shot), full_page=True)
        finally:
            context.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
