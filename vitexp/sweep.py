"""Multirun integration: check the whole sweep before anything is launched, and summarise it at the end.

Hydra runs `SweepCallback.on_multirun_start` in the launching process before the sweeper submits a
single job, so one bad combination stops the launch with nothing submitted. A grid (Hydra's basic
sweeper) is checked job by job; a sweeper that samples its jobs (Optuna) has no list to check, so each
value of its search space is checked instead. Jobs record their own failures (`failed.json`) instead of
raising, so every job runs and `on_multirun_end` can list them all, from the sweep's directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vitexp import search_report
from vitexp.cluster import EXIT_STOPPED, StopSignals, resume_command
from vitexp.config import SEARCH_METRICS, SearchConfig, config_diff, config_hash, semantic_config, validate
from vitexp.jobs import Job, expected_jobs, failure_line, job_state, search_space, sweep_jobs, varying_keys
from vitexp.launcher import first_line
from vitexp.logger import RunIdentity, Sinks, write_json
from vitexp.report import Report, sweep_defaults, write_report
from vitexp.rundir import HYDRA_DIR
from vitexp.wandb_logger import VARYING_KEYS_FILE

log = logging.getLogger("vitexp")


def error_line(err: Exception) -> str:
    return first_line(str(err)) or type(err).__name__


def checked_config(overrides: list[str], warnings: dict[str, None]) -> DictConfig:
    """The validated config of these overrides, adding its warnings to `warnings`; raises what is wrong."""
    from hydra import compose

    cfg = compose(config_name="config", overrides=overrides)
    warnings |= dict.fromkeys(validate(cfg).warnings())
    return cfg


def check_jobs(jobs: list[Job]) -> tuple[list[str], list[str]]:
    """Compose and validate every job's config; also refuse job directories holding another config.

    Returns the problems (any one stops the launch) and the distinct warnings of the jobs' configs.
    """
    problems: list[str] = []
    warnings: dict[str, None] = {}  # ordered, without repeats
    varying = varying_keys(jobs)
    for job in jobs:
        try:
            cfg = checked_config(job.overrides, warnings)
        except Exception as err:
            problems.append(f"job #{job.number} ({' '.join(job.varying(varying))}): {error_line(err)}")
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


def check_search_space(hydra_cfg: DictConfig) -> tuple[list[str], list[str]]:
    """Validate the config of each value of each swept parameter (with the fixed overrides) for a sweeper that
    samples: its jobs are not known before launch, but a value no job may take is. Returns problems and warnings.
    """
    fixed, swept = search_space(hydra_cfg)
    warnings: dict[str, None] = {}
    try:
        checked_config(fixed, warnings)
    except Exception as err:
        return [f"the fixed overrides ({' '.join(fixed)}): {error_line(err)}"], []
    problems = []
    for parameter, overrides in swept.items():
        for override in overrides:
            try:
                checked_config([*fixed, override], warnings)
            except Exception as err:
                problems.append(f"{parameter} at {override.partition('=')[2]}: {error_line(err)}")
    return problems, list(warnings)


def check_objective(config: DictConfig) -> list[str]:
    """An Optuna search has one objective, improved the way its metric improves: Optuna minimises by default, and
    minimising an accuracy (or maximising a loss) would search for the worst trial."""
    sweeper = config.hydra.sweeper
    if "optuna" not in str(sweeper.get("_target_", "")).lower():
        return []
    metric = OmegaConf.select(config, "hparams_search.metric", default=SearchConfig.metric)
    direction = sweeper.get("direction")
    direction = getattr(direction, "name", direction)  # Optuna's schema default is an enum, Direction.minimize
    expected = SEARCH_METRICS.get(metric)
    if expected is not None and direction != expected:
        return [
            f"hydra.sweeper.direction={direction} would search for the worst {metric}: set hydra.sweeper.direction="
            f"{expected} (hparams_search.direction={expected} with hparams_search=optuna)"
        ]
    began = study_objective(str(sweeper.get("storage") or ""), sweeper.get("study_name"))
    if began is not None and began != (metric, direction):
        return [
            f"the study {sweeper.study_name} in {sweeper.storage} searches for the best {began[0]} ({began[1]}), "
            f"not {metric} ({direction}): a relaunch continues a study as it began; start another search "
            "(another hydra.sweep.dir or hydra.sweeper.study_name) for another objective"
        ]
    return []


def study_objective(storage: str, study_name: str | None) -> tuple[str, str] | None:
    """(metric, direction) of an existing study in an SQLite file, None when there is none yet (never creating the
    file: connecting to a missing database would)."""
    path = Path(storage.removeprefix("sqlite:///"))
    if not storage.startswith("sqlite:///") or not path.exists():
        return None
    import optuna  # seconds to import: only when a search is relaunched

    try:
        return search_report.study_objective(optuna.load_study(study_name=study_name, storage=storage))
    except KeyError:  # another study's file
        return None


def print_jobs(jobs: list[Job]) -> None:
    print(f"{len(jobs)} jobs")
    print(f"{'#':>4}  {'state':8}  {'directory':40}  overrides")
    for job in jobs:
        print(f"{job.number:>4}  {job_state(job):8}  {job.directory!s:40}  {' '.join(job.overrides)}")


def print_search_space(hydra_cfg: DictConfig) -> None:
    """What a dry run of a sampling sweeper can show: the values checked for each swept parameter."""
    trials = f", {hydra_cfg.sweeper.n_trials} trials" if "n_trials" in hydra_cfg.sweeper else ""
    print(f"{hydra_cfg.sweeper._target_.rpartition('.')[2]} samples its jobs{trials}; each value below was checked")
    for parameter, overrides in search_space(hydra_cfg)[1].items():
        print(f"  {parameter}: {', '.join(o.partition('=')[2] for o in overrides)}")


def swept_keys(jobs: list[Job] | None, hydra_cfg: DictConfig) -> list[str]:
    """The override keys that tell the jobs apart: those whose value differs across the grid, or every
    parameter a sampling sweeper searches. Recorded for the jobs, each of which knows only its own overrides."""
    if jobs is not None:
        return sorted(varying_keys(jobs))
    swept = search_space(hydra_cfg)[1].values()
    return sorted({o.lstrip("+~").partition("=")[0] for overrides in swept for o in overrides})


IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def log_report(report: Report, config: DictConfig) -> None:
    """The report's table and plots to the sweep's logger sinks, as one `report` run beside the jobs'."""
    sinks_config = OmegaConf.to_object(config.logger)
    assert isinstance(sinks_config, dict)
    rows = report.table_rows()
    if not sinks_config or not rows:
        return
    sweep_name = config.hydra.runtime.choices.get("sweep")
    identity = RunIdentity({}, sweep_name=sweep_name, sweep_dir=report.sweep_dir, role="report")
    sinks = Sinks.build(sinks_config, report.sweep_dir, {}, identity)
    try:
        sinks.log_media({"sweep_report": rows}, {path.stem: path for path in report.plots})
    finally:
        sinks.finish(exit_code=0)


class SweepCallback(Callback):
    """Validate the grid before launch (`dry_run=true` only prints it); report and list failures after.

    When the jobs run in this process (Hydra's basic launcher), USR2 or SIGTERM stops the sweep cleanly:
    the running job checkpoints, the jobs after it do not start, and the report of what exists is written
    before the sweep exits with `EXIT_STOPPED`.
    """

    def __init__(self) -> None:
        self.stop: StopSignals | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = expected_jobs(config.hydra, sweep_dir)
        problems, warnings = check_jobs(jobs) if jobs is not None else check_search_space(config.hydra)
        problems += check_objective(config)
        if problems:
            print(
                f"error: nothing was launched; fix these {'jobs' if jobs is not None else 'values'} first:",
                file=sys.stderr,
            )
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            sys.exit(2)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if config.get("dry_run"):
            if jobs is not None:
                print_jobs(jobs)
            else:
                print_search_space(config.hydra)
            sys.exit(0)
        # `python -m vitexp.report` reads the sweep's config here: Hydra's basic sweeper writes it, not every sweeper
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        write_json(sweep_dir / VARYING_KEYS_FILE, {"varying_keys": swept_keys(jobs, config.hydra)})
        if config.hydra.launcher.get("_target_") == IN_PROCESS_LAUNCHER:
            self.stop = StopSignals().__enter__()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        stopped_by = None
        if self.stop is not None:  # the jobs are over: a signal from here on ends the process as usual
            stopped_by = self.stop.requested
            self.stop.__exit__()
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(sweep_dir, expected_jobs(config.hydra, sweep_dir))
        report = write_report(sweep_dir, jobs, sweep_defaults(config))
        log.info("sweep report: %s", report.markdown)
        log_report(report, config)
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
