"""Optuna search for Hydra multirun: search spaces, studies that resume, trials that may fail.

The Hydra sweeper plugin (hydra_plugins/finetune_optuna_sweeper) is a thin shell around this module.
Search spaces use Hydra's override grammar, as in `hydra-optuna-sweeper`:
    optimizer.lr: tag(log, interval(1e-4, 1e-2))      -> FloatDistribution(log=True)
    head.units: choice(64, 128, 256)                  -> CategoricalDistribution
    freeze.n: range(1, 5)                             -> IntDistribution(1, 4)
    head.dropout: interval(0.0, 0.5)                  -> FloatDistribution
    trainer.epochs: tag(int, interval(2, 8))          -> IntDistribution
A study lives in `storage` (SQLite by default), so running the same command again resumes it: the
trial budget `n_trials` counts every trial the study has finished, and trials left RUNNING by a sweep
that was killed are marked failed ("interrupted") and queued to run again with the same parameters.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.sweep.shared_study import tell  # noqa: F401 - the sweeper calls it as optuna_study.tell
from finetune.tracking.store import RUN_ID_FILE

INTERRUPTED = "interrupted"  # trial user attribute: the sweep stopped while this trial ran
RUN_ID = "mlflow_run_id"  # trial user attribute: the job's MLflow run
ERROR = "error"  # trial user attribute: why the job failed
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class SearchSpace:
    distributions: dict  # name -> optuna distribution
    fixed: list[str]  # plain overrides passed unchanged to every job


def search_space(params: dict[str, Any], arguments: list[str]) -> SearchSpace:
    """The sweeper's `params` plus the sweep overrides typed on the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    configured = parser.parse_overrides([f"{key}={value}" for key, value in (params or {}).items()])
    typed = parser.parse_overrides(list(arguments))
    distributions, fixed = {}, []
    for override in [*configured, *typed]:
        name = override.get_key_element()
        if override.is_sweep_override():
            distributions[name] = distribution_of(override)
        else:
            distributions.pop(name, None)  # a plain value on the command line pins a searched key
            fixed.append(override.input_line)
    return SearchSpace(distributions, fixed)


def distribution_of(override):
    import optuna.distributions as dist
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    value = override.value()
    tags = set(value.tags or ())
    if isinstance(value, ChoiceSweep):  # lists/dicts (e.g. head.units) become their text: Optuna wants scalars
        return dist.CategoricalDistribution([_text(item) if isinstance(item, (list, dict)) else item
                                             for item in override.sweep_iterator()])
    if isinstance(value, RangeSweep):
        step = value.step or 1
        if all(float(x).is_integer() for x in (value.start, value.stop, step)):
            last = int(value.stop) - int(step)
            return dist.IntDistribution(int(value.start), last, step=int(step), log="log" in tags)
        return dist.FloatDistribution(value.start, value.stop - step, step=step)
    if isinstance(value, IntervalSweep):
        if "int" in tags:
            return dist.IntDistribution(int(value.start), int(value.end), log="log" in tags)
        return dist.FloatDistribution(float(value.start), float(value.end), log="log" in tags)
    raise ValueError(f"{override.input_line}: not a search space Optuna can sample "
                     "(use choice(...), range(...), interval(...) or tag(log, interval(...)))")


def _text(item) -> str:
    if isinstance(item, list):
        return "[" + ",".join(_text(x) for x in item) + "]"
    if isinstance(item, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in item.items()) + "}"
    return str(item)


def override_of(name: str, value: Any) -> str:
    """`name=value` in Hydra's grammar, quoting strings that it would otherwise parse."""
    if isinstance(value, str) and value.startswith(("[", "{")):  # a list/dict choice, kept as text
        return f"{name}={value}"
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return f"{name}='{value}'"
    if isinstance(value, float):
        return f"{name}={value!r}"
    return f"{name}={value}"


def storage_url(storage: str | None) -> str | None:
    """Relative SQLite paths are made absolute (a job's working dir must not move the study)."""
    if not storage or not storage.startswith("sqlite:///"):
        return storage
    path = Path(os.path.expanduser(storage[len("sqlite:///"):]))
    return f"sqlite:///{path.resolve()}"


def make_sampler(name: str, seed: int | None, distributions: dict, offset: int):
    """TPE (default), random or grid. The seed moves on by the number of trials the study already has,
    so a resumed study does not replay the parameters its first trials had."""
    import optuna

    seed = None if seed is None else int(seed) + offset
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {}
        for key, distribution in distributions.items():
            if isinstance(distribution, optuna.distributions.CategoricalDistribution):
                grid[key] = list(distribution.choices)
            elif isinstance(distribution, optuna.distributions.IntDistribution):
                grid[key] = list(range(distribution.low, distribution.high + 1, distribution.step))
            else:
                raise ValueError(f"grid sampler: {key} is a continuous interval; use choice(...) or range(...)")
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"sampler {name!r}: expected tpe, random or grid")


def grid_size(distributions: dict) -> int:
    import optuna

    sizes = []
    for distribution in distributions.values():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            sizes.append(len(distribution.choices))
        else:
            sizes.append(len(range(distribution.low, distribution.high + 1, distribution.step)))
    return math.prod(sizes)


def open_study(study_name: str, storage: str | None, direction: str, sampler_name: str, seed,
               distributions: dict):
    """Create the study, or load it to resume; returns (study, number of trials it already had)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    existing = 0
    if storage:
        try:
            existing = len(optuna.load_study(study_name=study_name, storage=storage).trials)
        except KeyError:  # no such study yet
            existing = 0
    from finetune.sweep.shared_study import worker_offset

    sampler = make_sampler(sampler_name, seed, distributions, existing + worker_offset(storage))
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                direction=direction, load_if_exists=True)
    return study, existing


def recover_interrupted(study) -> list[int]:
    """Trials a killed sweep left RUNNING: mark them failed (interrupted) and queue their parameters
    to run again. Trials that other live sweep processes are running are theirs (finetune.sweep.shared_study).
    Returns their numbers."""
    import optuna

    from finetune.sweep.shared_study import owner_gone

    stale = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
             if owner_gone(t)]
    for trial in stale:
        mark_interrupted(study, trial)
    return [trial.number for trial in stale]


def mark_interrupted(study, trial) -> None:
    import optuna

    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
    tell(study, trial.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def trials_done(study) -> int:
    """Finished trials that count against the budget (interrupted ones are run again, and proposals set
    aside as duplicates never ran, so neither counts)."""
    from finetune.sweep.shared_study import DUPLICATE_OF

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in FINISHED_STATES and not t.user_attrs.get(INTERRUPTED)
               and t.user_attrs.get(DUPLICATE_OF) is None)


def job_error(job_return) -> str | None:
    """Why a Hydra job failed (the task's own exception), or None when it completed."""
    from hydra.core.utils import JobStatus

    if job_return.status == JobStatus.COMPLETED:
        return None
    cause = getattr(job_return, "_return_value", None)
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else "job failed"


def job_run_id(job_return) -> str | None:
    """The MLflow run the job recorded itself in (train writes its id into the job's output dir)."""
    from omegaconf import OmegaConf

    folder = OmegaConf.select(job_return.hydra_cfg, "hydra.runtime.output_dir") if job_return.hydra_cfg else None
    path = Path(str(folder)) / RUN_ID_FILE if folder else None
    return path.read_text().strip() if path and path.is_file() else None


def plot_study(study, folder: Path) -> list[Path]:
    """Optuna's own matplotlib plots of the study: optimization history, parameter importances (fANOVA,
    from 3 complete trials on) and slice; the files written. A plot Optuna cannot draw is left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    wanted = {"optimization_history": plots.plot_optimization_history, "slice": plots.plot_slice}
    if len(complete) >= 3:
        wanted["param_importances"] = plots.plot_param_importances
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend is "experimental"
                axes = plot(study)
        except Exception as error:  # noqa: BLE001 - a plot is a convenience; the study's result stands
            print(f"[finetune] Optuna {name} plot left out: {type(error).__name__}: {str(error)[:200]}")
            continue
        figure = np.atleast_1d(axes).flat[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
