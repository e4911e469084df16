"""Interruption: SIGKILL or SIGTERM at any point, then the same command again, continues the same MLflow run
from the last completed epoch and ends where an uninterrupted run ends."""
from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, TINY_SHAPES, printed_model_file, runs_of

pytestmark = pytest.mark.slow

EPOCHS = 3  # killed in epoch 2, terminated in epoch 3, finished: every resume path, one epoch each
# The backbone trains (block5: its weights go into each checkpoint; n=1 would be VGG16's weightless `top`
# block alone, a frozen backbone on cached features) and nothing random but the seeded data order:
# no dropout, no augmentation, no BatchNorm re-estimation at the end.
# VGG16 at 32 px: 19 layers, so each process traces its graphs in a few seconds (MobileNetV2: 155 layers).
RUN = ["backbone=vgg16", "backbone.weights=null", "backbone.input_shape=[32,32]", "trainer.batch_size=8",
       "trainer.verbose=0", *TINY_SHAPES, "freeze=last_n", "freeze.n=2", "head.dropout=0",
       f"trainer.epochs={EPOCHS}", "trainer.steps_per_epoch=8", "trainer.bn_recalibration=false",
       "trainer.early_stopping.enabled=false"]


def weights_of(path: Path) -> list[np.ndarray]:
    import keras

    import finetune.model.preprocessing  # noqa: F401  registers the preprocessing layer

    return [np.asarray(w) for w in keras.saving.load_model(path, safe_mode=True, compile=False).get_weights()]


def checkpoint_epoch(store, since: float) -> int:
    """Epochs done in the newest checkpoint under the store's outputs/ written after `since` (else 0)."""
    done = 0
    for state in Path(store, "outputs").glob("*/*/checkpoint/state.json"):
        try:
            if state.stat().st_mtime >= since:
                done = max(done, int(json.loads(state.read_text())["epoch"]))
        except (OSError, ValueError, KeyError):
            pass  # being replaced: the rename is atomic, a read between open and read is not
    return done


def interrupt_during_epoch(process, store, epoch: int, sig: int, since: float) -> None:
    """Send `sig` at a random point after this process checkpointed epoch `epoch - 1` (during epoch `epoch`)."""
    deadline = time.monotonic() + 400
    while checkpoint_epoch(store, since) < epoch - 1:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.2))
    process.send_signal(sig)


def test_killed_then_terminated_run_resumes_in_the_same_run_to_the_same_weights(tmp_path, start_cli, cli):
    store = tmp_path  # its own outputs/ folder, so the checkpoint found is this run's
    db = f"sqlite:///{store / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=db)

    # SIGKILL during epoch 2: nothing runs at exit; the run stays RUNNING, the checkpoint of epoch 1 stays
    first = start_cli(["train", *RUN], store, "resume")
    interrupt_during_epoch(first, store, 2, signal.SIGKILL, since=time.time() - 1)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    (run,) = runs_of(client, "resume")
    run_id = run.info.run_id

    # the same command again continues it; SIGTERM during its epoch 3 ends the run KILLED at once
    since = time.time()
    second = start_cli(["train", *RUN], store, "resume")
    interrupt_during_epoch(second, store, 3, signal.SIGTERM, since)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "run the same command again" in err, err[-3000:]
    (run,) = runs_of(client, "resume")
    assert run.info.run_id == run_id and run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["error"]

    # and once more: it finishes, in the same run, with one value per epoch
    third = cli("train", *RUN, experiment="resume", cwd=store)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "continuing the interrupted run" in third.stdout
    (run,) = runs_of(client, "resume")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_epoch"]) >= 2
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
        assert steps == list(range(EPOCHS)), (metric, steps)
    resumed_model = printed_model_file(third.stdout)
    assert not (resumed_model.parents[1] / "checkpoint").exists()  # superseded by the saved model

    # an uninterrupted run of the same config ends with the same weights (seeded data order)
    reference = cli("train", *RUN, "trainer.resume=never", experiment="resume_reference", cwd=store)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected, got = weights_of(printed_model_file(reference.stdout)), weights_of(resumed_model)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_resume_of_a_folder_without_checkpoint_is_one_line(cli, tmp_path):
    from tests.conftest import one_error_line

    line = one_error_line(cli("train", *TINY, *TINY_SHAPES, f"trainer.resume={tmp_path}"))
    assert "trainer.resume" in line and "checkpoint/state.json" in line
