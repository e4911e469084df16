"""What reaches the terminal: finetune's own lines, not TensorFlow's start-up chatter (absl's pre-init
warning, "Could not find cuda drivers", "failed call to cuInit", oneDNN and CPU-instruction notices),
unless the user asks for it with FINETUNE_TF_LOGS=1. The filter never drops a fatal line, a traceback
or an `error:` line, and keeps the order of what it passes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from finetune.app.tf_logs import filtered_stderr, is_noise
from tests.conftest import TINY, TINY_SHAPES, cli_command, cli_env

# TensorFlow's lines as a user recognises them, written independently of the filter's own patterns
TF_LINE = re.compile(r"absl|cuInit|cuda|oneDNN|cpu_feature_guard|rebuild TensorFlow|^[IWEF]\d{4} \d+:\d+:\d+\.\d+ ")

CUINIT = ("E0000 00:00:1796209170.771605    6937 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)")
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796209166.090309    6937 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    CUINIT,
    "I0000 00:00:1796209268.235345    8252 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
    "2024-03-01 10:00:00.123456: I tensorflow/core/util/port.cc:113] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors from different computation orders. "
    "To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "E0000 00:00:1710000000.000000    123 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register "
    "factory for plugin cuDNN when one has already been registered",
    "W0000 00:00:1710000000.000000    123 some_op.cc:10] a warning-level line",
]
KEPT = [
    "F0000 00:00:1796209170.771605    6937 tensor_shape.cc:42] Check failed: d >= 0 (-1 vs. 0)",
    "E0000 00:00:1796209170.771605    6937 bfc_allocator.cc:485] Allocator ran out of memory trying to allocate 2.0GiB",
    "Traceback (most recent call last):",
    "error: extract.layer: received 'no_such_layer'; expected a layer of mobilenetv2_1.00_32",
    "Fatal Python error: Segmentation fault",
    "/venv/lib/python3.11/site-packages/keras/src/x.py:12: UserWarning: something the user should read",
    "generating shapes dataset: 24 images -> /tmp/cache/shapes/545edd0d0717b802",
    "",
]


@pytest.mark.parametrize("line", NOISE)
def test_tensorflow_start_up_lines_are_noise(line):
    assert TF_LINE.search(line), line  # the test's own pattern knows them too
    assert is_noise(line + "\n")


@pytest.mark.parametrize("line", KEPT)
def test_fatal_lines_errors_and_python_output_are_never_noise(line):
    assert not is_noise(line + "\n")
    assert not is_noise(line + "\n", level=3) or line.startswith("E0000")  # level 3: TF's errors off, not fatal


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, whose stderr is a real file descriptor 2 (not pytest's capture)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_the_filter_passes_real_lines_in_order_and_hands_stderr_back():
    result = python(f"""
        import os, sys
        from finetune.app.tf_logs import filtered_stderr
        with filtered_stderr():
            os.write(2, {(NOISE[0] + chr(10) + NOISE[1] + chr(10) + "first real line" + chr(10)).encode()!r})
            print("error: second, from Python", file=sys.stderr)
            os.write(2, {(CUINIT + chr(10) + KEPT[0] + chr(10) + "no newline at the end").encode()!r})
        print("after the filter", file=sys.stderr)
    """)
    assert result.returncode == 0, result.stderr
    # a last line without its newline is passed as it is, not held back or lost
    assert result.stderr == (f"first real line\nerror: second, from Python\n{KEPT[0]}\n"
                             "no newline at the endafter the filter\n"), result.stderr


def test_what_tensorflow_writes_before_it_aborts_still_reaches_the_terminal():
    """A fatal line followed by abort() inside the filtered import: the filter runs in its own process and
    drains the pipe after this one is gone."""
    result = python(f"""
        import os
        from finetune.app.tf_logs import filtered_stderr
        with filtered_stderr():
            os.write(2, {(NOISE[0] + chr(10) + KEPT[0] + chr(10)).encode()!r})
            os.abort()
    """)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [KEPT[0]], result.stderr


# -- through the real CLI --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_output") / "img.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def run_cli(store, cache_dir, *args, **env):
    """The CLI in the session's store (its MLflow tables made already: MLflow's own first-run lines are not
    the point here), with TF_CPP_MIN_LOG_LEVEL unset, as in a user's shell."""
    full_env = cli_env(cache_dir, env)
    full_env.pop("TF_CPP_MIN_LOG_LEVEL")
    return subprocess.run(cli_command(args), cwd=store, env=full_env, capture_output=True, text=True, timeout=600)


def extract_error(store, cache_dir, mlflow_client, image, **env):
    """An error raised after TensorFlow is imported: an extract.layer the backbone does not have."""
    mlflow_client.search_experiments()  # creates the store's tables in this process
    return run_cli(store, cache_dir, "extract", "backbone=mobilenet_v2", "backbone.weights=null",
                   "backbone.input_shape=[32,32]", "extract.layer=no_such_layer", f"images={image}",
                   "tracking.experiment=cli_output_error", **env)


@pytest.mark.slow
def test_an_error_after_tensorflow_started_is_one_line(store, cache_dir, mlflow_client, image):
    result = extract_error(store, cache_dir, mlflow_client, image)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: extract.layer: received 'no_such_layer'; expected a layer of mobilenetv2_1.00_32 "
        "(did you mean 'input_layer'?)"], result.stderr


@pytest.mark.slow
def test_finetune_tf_logs_brings_tensorflows_lines_back(store, cache_dir, mlflow_client, image):
    result = extract_error(store, cache_dir, mlflow_client, image, FINETUNE_TF_LOGS="1")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert [line for line in lines if TF_LINE.search(line)], result.stderr
    assert lines[-1].startswith("error: extract.layer: received 'no_such_layer'"), result.stderr


@pytest.mark.slow
def test_a_training_run_shows_no_tensorflow_lines(store, cache_dir, mlflow_client):
    mlflow_client.search_experiments()
    result = run_cli(store, cache_dir, "train", *TINY, *TINY_SHAPES, "tracking.experiment=cli_output_train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== finetune train: done ==" in result.stdout
    noise = [line for line in (result.stdout + result.stderr).splitlines() if TF_LINE.search(line)]
    assert noise == [], noise
