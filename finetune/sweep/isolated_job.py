"""Run one sweep job in a fresh Python process (trainer.isolate_sweep_jobs).

TensorFlow/Keras keep memory of every model built in a process (native, not released by
`keras.backend.clear_session()`), so a sweep whose jobs share one process grows job after job. Here the
job's command runs in a child interpreter started with subprocess (not multiprocessing: a launcher's
worker, e.g. joblib's loky, has its own start method that a spawned child cannot set up). The job's
config and resolved Hydra config go to the child over a pipe (pickled: an in-memory hand-over between
this program's own processes, never a file); the result, or the error, comes back as JSON in a file
of the job's output folder. The child shares the terminal and the process group, and on Linux is
killed by the kernel if the sweep's process dies first.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.errors import FinetuneError

RESULT_FILE = ".job_result.json"


class JobCrashed(RuntimeError):
    """The job's process failed with something other than a user error (its traceback is above)."""


def run_isolated(command: str, cfg: DictConfig, output_dir: Path):
    """`finetune.commands.<command>.run(cfg, output_dir)` in a child process; returns what it returns,
    raises FinetuneError with the child's message for a user error, JobCrashed for anything else."""
    from hydra.core.hydra_config import HydraConfig

    # ${now:...} and ${hydra:...} resolve against this process' state (the sweep's time stamp is cached
    # in the job's full config): resolve them here, on the live nodes, and send plain values.
    hydra_node = OmegaConf.to_container(HydraConfig.get(), resolve=True)
    cfg = OmegaConf.create(cfg)  # a copy, same schema
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.resolve(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result_file = output_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    payload = pickle.dumps({"command": command, "cfg": cfg, "hydra": hydra_node, "output_dir": str(output_dir),
                            "result_file": str(result_file), "parent_pid": os.getpid()})
    done = subprocess.run([sys.executable, "-m", "finetune.sweep.isolated_job"], input=payload, check=False)
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result_file.unlink(missing_ok=True)
    if "result" in outcome:
        return outcome["result"]
    if outcome.get("user_error"):
        raise FinetuneError(outcome["user_error"])
    raise JobCrashed(outcome.get("error") or f"the job's process ended with exit status {done.returncode}")


def _die_with(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when the sweep's process dies (killed with SIGKILL,
    say), rather than leave an orphan job training and logging on."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before that took effect
        os._exit(1)


def _child() -> int:
    request = pickle.loads(sys.stdin.buffer.read())
    _die_with(request["parent_pid"])
    from finetune.app.keras_import import keras_without_sklearn
    from finetune.app.tf_logs import quiet_tensorflow

    quiet_tensorflow()  # as the CLI does: TensorFlow's start-up lines off the terminal (FINETUNE_TF_LOGS=1 shows them)
    keras_without_sklearn()  # as the CLI does: Keras without its scikit-learn wrappers
    from hydra.core.hydra_config import HydraConfig

    from finetune.config.schema import register_configs

    register_configs()
    # What HydraConfig.set_config leaves, minus its check that the node is typed as Hydra's dataclass.
    hydra_cfg = OmegaConf.create({"hydra": request["hydra"]})
    OmegaConf.set_readonly(hydra_cfg, True)
    HydraConfig.instance().cfg = hydra_cfg
    result_file = Path(request["result_file"])
    module = importlib.import_module(f"finetune.commands.{request['command']}")
    try:
        result = module.run(request["cfg"], Path(request["output_dir"]))
    except FinetuneError as error:
        result_file.write_text(json.dumps({"user_error": str(error)}))
        return 1
    except BaseException as error:
        result_file.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"[:5000]}))
        raise
    result_file.write_text(json.dumps({"result": result}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
