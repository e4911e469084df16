"""A Hydra sweeper that asks Optuna (a current release) for each trial and runs it as a Hydra job.

Chosen over the published hydra-optuna-sweeper, which pins optuna<3 (and so cannot share an
environment with MLflow 3's SQLAlchemy 2), restarts its trial budget on every run and leaves trials of a
killed sweep RUNNING for ever. Here a failed job is a failed trial and the sweep goes on; the study
resumes from its storage. Several sweep processes may share one study on a database storage
(finetune.sweep.shared_study). The logic is in finetune.sweep.optuna_study.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from finetune.sweep.shared_study import ask_unique, redact, running_elsewhere

log = logging.getLogger(__name__)
WAIT_FOR_OTHERS_S = 2.0  # between looks at a shared study whose remaining trials other processes run


class FinetuneOptunaSweeper(Sweeper):
    def __init__(self, sampler: str = "tpe", seed: int | None = 0, direction: str = "maximize",
                 study_name: str = "finetune", storage: str | None = None, n_trials: int = 20,
                 n_jobs: int = 1, max_consecutive_failures: int = 5, params: Any = None) -> None:
        self.sampler_name, self.direction = getattr(sampler, "value", sampler), getattr(direction, "value", direction)
        self.seed = seed
        self.study_name, self.n_trials, self.n_jobs = study_name, int(n_trials), max(1, int(n_jobs))
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) \
            else dict(params or {})
        from finetune.sweep.optuna_study import storage_url

        self.storage = storage_url(storage)
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> Any:
        from finetune.sweep import parent as mlflow_sweep
        try:
            return self._sweep(arguments)
        except KeyboardInterrupt:
            mlflow_sweep.end_parent(self.config, "KILLED", "interrupted: the sweep was stopped")
            raise
        except BaseException as error:
            mlflow_sweep.end_parent(self.config, "FAILED", f"{type(error).__name__}: {error}")
            raise

    def _sweep(self, arguments: list[str]) -> Any:
        import optuna

        from finetune.sweep import optuna_study as osw
        space = osw.search_space(self.params, arguments)
        if not space.distributions:
            raise ValueError("Optuna sweeper: nothing to search; set hydra.sweeper.params or pass "
                             "key=choice(...)/interval(...) overrides")
        n_trials = self.n_trials
        if self.sampler_name == "grid":
            n_trials = min(n_trials, osw.grid_size(space.distributions))
        study, existing = osw.open_study(self.study_name, self.storage, self.direction, self.sampler_name,
                                         self.seed, space.distributions)
        interrupted = osw.recover_interrupted(study)
        done = osw.trials_done(study)
        print(f"[finetune] Optuna study {self.study_name!r} ({redact(self.storage) or 'in memory'}): "
              f"{done} of {n_trials} trials done"
              + (f"; re-running interrupted trial(s) {interrupted}" if interrupted else ""))
        failures_in_a_row = 0
        while done < n_trials:
            free = min(self.n_jobs, n_trials - done - running_elsewhere(study))
            if free <= 0:  # the rest of the budget is running in other sweep processes on this study
                time.sleep(WAIT_FOR_OTHERS_S)
                done = osw.trials_done(study)
                continue
            batch = [ask_unique(study, space.distributions) for _ in range(free)]
            overrides = [[*space.fixed, *(osw.override_of(k, v) for k, v in trial.params.items())]
                         for trial in batch]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except KeyboardInterrupt:
                for trial in batch:
                    osw.mark_interrupted(study, trial)
                raise
            self.job_idx += len(returns)
            for trial, job in zip(batch, returns):
                failed = self._tell(study, trial, job)
                failures_in_a_row = failures_in_a_row + 1 if failed else 0
            done = osw.trials_done(study)
            if failures_in_a_row >= self.max_consecutive_failures:
                raise RuntimeError(f"Optuna sweeper: {failures_in_a_row} trials in a row failed "
                                   "(hydra.sweeper.max_consecutive_failures); see the trials' errors")
        return self._report(study, optuna)

    def _tell(self, study, trial, job) -> bool:
        """Record the job's result as the trial's; returns True when the trial failed."""
        import optuna

        from finetune.sweep import optuna_study as osw
        run_id = osw.job_run_id(job)
        if run_id:
            study._storage.set_trial_user_attr(trial._trial_id, osw.RUN_ID, run_id)
            self._tag_run(run_id, trial.number)
        error = osw.job_error(job)
        value = None if error else job.return_value
        if error is None and (value is None or not isinstance(value, (int, float))):
            error = f"the job returned {value!r}, not a number to {self.direction}"
        if error:
            study._storage.set_trial_user_attr(trial._trial_id, osw.ERROR, error[:2000])
            osw.tell(study, trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, error.splitlines()[0][:300])
            print(f"[finetune] trial {trial.number} FAILED: {error.splitlines()[0][:300]}")
            return True
        osw.tell(study, trial, float(value))
        print(f"[finetune] trial {trial.number}: {float(value):.4f}  {trial.params}")
        return False

    def _tag_run(self, run_id: str, number: int) -> None:
        try:
            from finetune.sweep.parent import _client

            client, _ = _client(self.config)
            client.set_tag(run_id, "optuna.trial", str(number))
            client.set_tag(run_id, "optuna.study", self.study_name)
        except Exception as error:  # noqa: BLE001 - tags are a convenience; the trial result stands
            log.warning("could not tag MLflow run %s: %s", run_id, error)

    def _report(self, study, optuna) -> dict:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        failed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                  if not t.user_attrs.get("interrupted")]
        result = {"name": "finetune_optuna", "study_name": self.study_name, "storage": redact(self.storage),
                  "direction": self.direction, "trials_complete": len(complete), "trials_failed": len(failed)}
        if complete:
            best = study.best_trial
            result.update(best_value=best.value, best_params=best.params, best_trial=best.number,
                          best_mlflow_run_id=best.user_attrs.get("mlflow_run_id"))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(result), self.sweep_dir / "optimization_results.yaml")
        if complete:  # logged to the sweep's parent run when it ends (finetune.sweep.parent)
            from finetune.sweep import optuna_study as osw
            from finetune.sweep.parent import OPTUNA_PLOTS

            osw.plot_study(study, self.sweep_dir / OPTUNA_PLOTS)
        print(f"[finetune] Optuna study {self.study_name!r}: {len(complete)} complete, {len(failed)} failed; "
              + (f"best {result['best_value']:.4f} with {result['best_params']}" if complete else "no result")
              + f"\n[finetune] results: {self.sweep_dir / 'optimization_results.yaml'}")
        return result
