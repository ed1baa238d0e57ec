"""Optuna searches that survive a cluster: `hparams_search=optuna` runs this sweeper (hydra-optuna-sweeper's,
with its trial loop replaced).

The plugin's loop asks `n_trials` new trials on every launch and numbers its jobs from 0, so relaunching an
interrupted search would start it over in directories that hold other trials. Here the study (kept in the
sweep directory) is the record: a launch first reruns the trials a killed or stopped sweep left running, with
their own parameters and job numbers, so each resumes from its `last.pt`; then it asks new trials, numbered
after the study's, until the study holds `n_trials`. Job number = trial number = directory name.

A trial's objective is read from its directory, not from the task's return value: the best value over its
validation epochs of `hparams_search.metric` (`jobs.objective`). A run that failed or diverged is told to the
study as FAIL, never as a number; a run stopped by a signal is left RUNNING for the next launch to resume.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from vitexp.config import SearchConfig
from vitexp.jobs import Job, job_state, objective, stopped

log = logging.getLogger("vitexp")


class SearchSweeper(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper whose study continues across launches (see the module's docstring)."""

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        distributions, fixed = self.space(arguments)
        self.metric = OmegaConf.select(self.config, "hparams_search.metric", default=SearchConfig.metric)
        [self.direction_name] = self._get_directions()  # one, fitting the metric: `sweep.check_objective`
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            direction=self.direction_name,
            load_if_exists=True,
        )
        if "metric" not in study.user_attrs:  # what a relaunch must optimise too (`search_report.study_objective`)
            study.set_user_attr("metric", self.metric)
        self.sweep_path = Path(self.config.hydra.sweep.dir)
        left = [trial for trial in study.trials if trial.state == TrialState.RUNNING]
        unfinished = 0
        if left:
            log.info("resuming trials %s, left running by an earlier launch", ", ".join(str(t.number) for t in left))
            unfinished = self.run_trials(study, left, [self.overrides(trial) for trial in left])
        # A trial that did not finish (stopped, or its job lost) ends the asking: the relaunch resumes it first,
        # and new trials are sampled knowing its value, not drawn blind while nothing finishes.
        while not unfinished and (to_go := self.n_trials - len(study.trials)) > 0 and not self.too_many_failures(study):
            asked = [study.ask() for _ in range(min(self.n_jobs, to_go))]
            unfinished = self.run_trials(study, asked, self._configure_trials(asked, distributions, fixed))
        if unfinished:
            log.warning(
                "%d trial(s) did not finish: no more were asked; relaunching the search resumes them", unfinished
            )
        self.write_results(study)

    def space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
        """The distributions to sample and the fixed overrides, from `hydra.sweeper.params` and the command line."""
        distributions, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        distributions = {**(self.search_space_distributions or {}), **distributions}
        for name in fixed:
            distributions.pop(name, None)
        if isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, functools.reduce(lambda n, values: n * len(values), grid.values(), 1))
        return distributions, fixed

    @staticmethod
    def overrides(trial: FrozenTrial) -> tuple[str, ...]:
        """A trial's overrides as `_configure_trials` wrote them when it was first launched: its sampled parameters,
        then the fixed ones it ran with (kept in its user attributes), whatever this launch's command line says."""
        return tuple(f"{name}={value}" for name, value in {**trial.params, **trial.user_attrs}.items())

    def run_trials(self, study: optuna.Study, trials: Sequence[Trial | FrozenTrial], overrides: Sequence[Any]) -> int:
        """Launch the trials (job number = trial number, so consecutive numbers go out together), tell the study
        how each ended, and return how many did not finish."""
        batch: list[int] = []
        unfinished = 0
        for index, trial in enumerate(trials):
            if batch and (trial.number != trials[batch[-1]].number + 1 or len(batch) == self.n_jobs):
                unfinished += self.launch_and_tell(study, [trials[i] for i in batch], [overrides[i] for i in batch])
                batch = []
            batch.append(index)
        if batch:
            unfinished += self.launch_and_tell(study, [trials[i] for i in batch], [overrides[i] for i in batch])
        return unfinished

    def launch_and_tell(self, study: optuna.Study, trials: list[Trial | FrozenTrial], overrides: list[Any]) -> int:
        """Tell each trial's objective, read from its directory once its job returned a result (the best val acc:
        a job that found its directory holding another run returns NaN and finds old results there). A job that
        stopped at a checkpoint, was lost or never started stays RUNNING for the relaunch; returns their count."""
        returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
        unfinished = 0
        for trial, ret in zip(trials, returns, strict=True):
            job = Job(trial.number, [], self.sweep_path / str(trial.number))
            value = objective(job, self.metric, self.direction_name) if math.isfinite(returned(ret)) else None
            if value is None and (stopped(job) or job_state(job) in ("running", "started", "new")):
                log.warning("trial %d did not finish: a relaunch of the search resumes it", trial.number)
                unfinished += 1
            elif value is None or not math.isfinite(value):
                tell(study, trial.number, None, TrialState.FAIL)
                log.warning(
                    "trial %d failed (%s): told as failed",
                    trial.number,
                    "no result" if value is None else f"{self.metric} not finite",
                )
            else:
                tell(study, trial.number, value, TrialState.COMPLETE)
                log.info("trial %d: %s %.4f", trial.number, self.metric, value)
        return unfinished

    def too_many_failures(self, study: optuna.Study) -> bool:
        """More than `max_failure_rate` of `n_trials` failed: whatever fails them (a broken data path, a space
        that diverges everywhere) would fail the rest too, so no more trials are asked."""
        failed = sum(trial.state == TrialState.FAIL for trial in study.trials)
        if failed <= self.max_failure_rate * self.n_trials:
            return False
        print(
            f"error: the search stopped asking trials: {failed} of {len(study.trials)} failed, more than "
            f"hydra.sweeper.max_failure_rate={self.max_failure_rate:g} of n_trials={self.n_trials}",
            file=sys.stderr,
        )
        return True

    def write_results(self, study: optuna.Study) -> None:
        """optimization_results.yaml as the plugin writes it (best params and value), with the trial and metric."""
        complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
        if not complete:
            log.warning("no trial finished: no optimization_results.yaml")
            return
        best = study.best_trial
        results = {
            "name": "optuna",
            "best_params": best.params,
            "best_value": best.value,
            "best_trial": best.number,
            "metric": self.metric,
            "direction": self.direction_name,
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_path / "optimization_results.yaml")
        log.info("best trial %d: %s %.4f with %s", best.number, self.metric, best.value, best.params)


def returned(ret: Any) -> float:
    """What a job's task returned (the best validation accuracy; NaN when it did not finish), NaN if it raised."""
    try:
        return float(ret.return_value)
    except Exception:  # the job's own exception, re-raised by JobReturn: its directory's failed.json tells it
        return math.nan


def tell(study: optuna.Study, number: int, value: float | None, state: TrialState) -> None:
    """`study.tell`, which records the trial before a GridSampler, its grid done, raises that the study is over."""
    try:
        study.tell(number, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
