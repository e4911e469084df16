"""Several sweep processes on one Optuna study: Optuna's distributed mode (a shared database storage, e.g.
`hydra.sweeper.storage=postgresql+psycopg2://...`, one process per SLURM array task).

What one process must not do to the others:
- **propose what they propose**: every process would seed its sampler alike. With a database storage each
  process adds its worker index to the seed (FINETUNE_SWEEP_WORKER, else SLURM_ARRAY_TASK_ID, else
  SLURM_PROCID, else its pid), and a proposal whose parameters another trial already has (running or
  finished) is set aside (`duplicate_of`, not counted) and asked again;
- **take their running trials for a killed sweep's**: each trial records the host and pid of the process
  that runs it. Only trials whose process is gone (on this host), or that record none (older studies),
  count as interrupted and run again; trials of live processes and of other hosts are left to them;
- **overshoot the budget**: a process asks for a trial only while finished + running trials, of every
  process, are below `n_trials`;
- **leak the storage's password**: where the storage URL is shown or recorded (the MLflow parent's study
  tag and params, the printed lines, optimization_results.yaml), the password is replaced by `***`.
"""
from __future__ import annotations

import os
import re
import socket

HOST, PID = "sweep_host", "sweep_pid"  # trial user attributes: who runs the trial
DUPLICATE_OF = "duplicate_of"  # trial user attribute: set aside, the same parameters as that trial
WORKER_ENV = ("FINETUNE_SWEEP_WORKER", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID")
MAX_ASKS = 20  # proposals tried before a duplicate is run anyway (a small discrete space may be exhausted)


def is_shared(storage: str | None) -> bool:
    """A storage other processes (or machines) can work on at the same time: a database server."""
    return bool(storage) and not str(storage).startswith(("sqlite:", "journal"))


def worker_offset(storage: str | None) -> int:
    """What this process adds to the sampler's seed: 0 unless the storage is shared."""
    if not is_shared(storage):
        return 0
    for name in WORKER_ENV:
        value = os.environ.get(name, "")
        if value.isdigit():
            return 1000 * (int(value) + 1)
    return 1000 * os.getpid()


def redact(url: str | None) -> str | None:
    """The URL with its password replaced by *** (scheme://user:***@host/...)."""
    if not url:
        return url
    return re.sub(r"(://[^/:@]+:)[^@/]*@", r"\1***@", str(url))


def claim(study, trial) -> None:
    """Record that this process runs `trial`."""
    study._storage.set_trial_user_attr(trial._trial_id, HOST, socket.gethostname())
    study._storage.set_trial_user_attr(trial._trial_id, PID, os.getpid())


def owner_gone(trial) -> bool:
    """True when the process that ran this RUNNING trial is gone (or unknown: a study from before owners were
    recorded); False while it lives, or when it runs on another host (that host's sweeps recover it)."""
    host, pid = trial.user_attrs.get(HOST), trial.user_attrs.get(PID)
    if host is None or pid is None:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()  # this very process starting again cannot hold a running trial


def ask_unique(study, distributions: dict):
    """study.ask, claimed by this process; proposals that repeat another trial's parameters are set aside
    (told FAIL with `duplicate_of`, not counted against the budget) and asked again."""
    import optuna

    for _ in range(MAX_ASKS):
        trial = study.ask(distributions)
        claim(study, trial)
        same = [t for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and t.params == trial.params and not t.user_attrs.get(DUPLICATE_OF)
                and t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)]
        if not same:
            return trial
        study._storage.set_trial_user_attr(trial._trial_id, DUPLICATE_OF, same[0].number)
        tell(study, trial, state=optuna.trial.TrialState.FAIL)
    return trial


def tell(study, trial, *args, **kwargs) -> None:
    """study.tell, where the grid sampler's "grid exhausted" signal is not an error: it calls
    study.stop(), which raises outside study.optimize, after the result is stored."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise


def running_elsewhere(study) -> int:
    """Trials other live processes are running now."""
    import optuna

    return sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get(PID) != os.getpid() and not owner_gone(t))
