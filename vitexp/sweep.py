"""Multirun integration: check the whole grid before anything is launched, and summarise it at the end.

Hydra runs `SweepCallback.on_multirun_start` in the launching process before the sweeper submits a
single job, so one bad combination stops the launch with nothing submitted. Jobs record their own
failures (`failed.json`) instead of raising, so every job runs and `on_multirun_end` can list them all.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vitexp.cluster import EXIT_STOPPED, StopSignals, resume_command
from vitexp.config import config_diff, config_hash, semantic_config, validate
from vitexp.jobs import Job, expand_jobs, failure_line, job_state, varying_keys
from vitexp.report import sweep_defaults, write_report
from vitexp.rundir import HYDRA_DIR

log = logging.getLogger("vitexp")


def check_jobs(jobs: list[Job]) -> tuple[list[str], list[str]]:
    """Compose and validate every job's config; also refuse job directories holding another config.

    Returns the problems (any one stops the launch) and the distinct warnings of the jobs' configs.
    """
    from hydra import compose

    problems: list[str] = []
    warnings: dict[str, None] = {}  # ordered, without repeats
    varying = varying_keys(jobs)
    for job in jobs:
        shown = " ".join(job.varying(varying))
        try:
            cfg = compose(config_name="config", overrides=job.overrides)
            warnings |= dict.fromkeys(validate(cfg).warnings())
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(f"job #{job.number} ({shown}): {message}")
            continue
        state = job_state(job)
        if state == "running":
            problems.append(f"job #{job.number}: {job.directory} is in use by a running job")
        previous = job.directory / HYDRA_DIR / "config.yaml"  # written when that job started
        if previous.exists():
            old, new = (OmegaConf.to_container(c, resolve=True) for c in (OmegaConf.load(previous), cfg))
            assert isinstance(old, dict) and isinstance(new, dict)
            if config_hash(old) != config_hash(new):
                diff = "; ".join(config_diff(semantic_config(old), semantic_config(new))[:3])
                problems.append(f"job #{job.number}: {job.directory} holds a run of another config ({diff})")
    return problems, list(warnings)


def print_jobs(jobs: list[Job]) -> None:
    print(f"{len(jobs)} jobs")
    print(f"{'#':>4}  {'state':8}  {'directory':40}  overrides")
    for job in jobs:
        print(f"{job.number:>4}  {job_state(job):8}  {job.directory!s:40}  {' '.join(job.overrides)}")


IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class SweepCallback(Callback):
    """Validate the grid before launch (`dry_run=true` only prints it); report and list failures after.

    When the jobs run in this process (Hydra's basic launcher), USR2 or SIGTERM stops the sweep cleanly:
    the running job checkpoints, the jobs after it do not start, and the report of what exists is written
    before the sweep exits with `EXIT_STOPPED`.
    """

    def __init__(self) -> None:
        self.stop: StopSignals | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = expand_jobs(config.hydra, Path(config.hydra.sweep.dir))
        problems, warnings = check_jobs(jobs)
        if problems:
            print("error: nothing was launched; fix these jobs first:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(2)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if config.get("dry_run"):
            print_jobs(jobs)
            sys.exit(0)
        if config.hydra.launcher.get("_target_") == IN_PROCESS_LAUNCHER:
            self.stop = StopSignals().__enter__()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        stopped_by = None
        if self.stop is not None:  # the jobs are over: a signal from here on ends the process as usual
            stopped_by = self.stop.requested
            self.stop.__exit__()
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = expand_jobs(config.hydra, sweep_dir)
        report = write_report(sweep_dir, jobs, sweep_defaults(config))
        log.info("sweep report: %s", report.markdown)
        if config.logger.name == "wandb":
            report.log_to_wandb(config)
        failed = [job for job in jobs if job_state(job) != "done"]
        if not failed:
            return
        varying = varying_keys(jobs)
        print(f"{len(failed)} of {len(jobs)} jobs did not finish:", file=sys.stderr)
        for job in failed:
            print(f"  #{job.number} {' '.join(job.varying(varying))}: {failure_line(job)}", file=sys.stderr)
        if stopped_by is not None:
            print(f"the sweep was stopped by {stopped_by.name}; resume it with:", file=sys.stderr)
            print(f"  {resume_command('hydra.sweep.dir', sweep_dir)}", file=sys.stderr)
            sys.exit(EXIT_STOPPED)
        sys.exit(1)
