"""A sweep's jobs: what its sweeper will launch, what its directory holds, and the state of each job.

Hydra's basic sweeper launches a grid that is known before launch; its own `split_arguments` lists it in
its order, so job numbers and directories match. A sampling sweeper (Optuna's `interval(...)`,
`choice(...)`) has no such list: `search_space` gives each swept parameter's values to check instead.
Once jobs have started, their directories say the rest — the overrides (`.hydra/overrides.yaml`, written
by the run when it starts) and the state (results.json, failed.json, the lock, last.pt) — so the
end-of-sweep summary, the report and the relaunch checks work whatever sweeper and launcher made the jobs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from omegaconf import DictConfig, OmegaConf

from vitexp.checkpoint import LAST_FILE
from vitexp.logger import METRICS_FILE, RESULTS_FILE, read_jsonl
from vitexp.rundir import FAILED_FILE, HYDRA_DIR, LOCK_FILE

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class Job:
    number: int
    overrides: list[str]
    directory: Path

    def varying(self, keys: set[str]) -> list[str]:
        """This job's overrides of `keys`: what tells it apart from the other jobs of its sweep."""
        return [o for o in self.overrides if o.lstrip("+~").partition("=")[0] in keys]


def sweep_overrides(hydra_cfg: DictConfig) -> list[Override]:
    """The sweeper's params, then the command line's overrides, parsed as every Hydra sweeper reads them.

    A glob sweep lists a group's options, so the parser gets the running app's config loader when there is one.
    """
    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    hydra = GlobalHydra.instance()
    parser = OverridesParser.create(config_loader=hydra.config_loader() if hydra.is_initialized() else None)
    return parser.parse_overrides(params + list(hydra_cfg.overrides.task))


def expected_jobs(hydra_cfg: DictConfig, sweep_dir: Path) -> list[Job] | None:
    """The jobs the sweeper will launch, in its order; None for a sweeper that has no finite list."""
    if hydra_cfg.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches = BasicSweeper.split_arguments(sweep_overrides(hydra_cfg), max_batch_size=None)
    return [Job(n, list(overrides), sweep_dir / str(n)) for n, overrides in enumerate(batches[0] if batches else [])]


def search_space(hydra_cfg: DictConfig) -> tuple[list[str], dict[str, list[str]]]:
    """For a sampling sweeper: the fixed overrides, and each swept parameter (as written) -> the overrides to check.

    A choice, range or glob gives every value; an interval (also inside `tag(log, ...)`) its two ends, since
    vitexp's rules are ranges. A key given twice keeps its last setting, as in every Hydra sweeper.
    """
    fixed: dict[str, str] = {}
    swept: dict[str, tuple[str, list[str]]] = {}
    for override in sweep_overrides(hydra_cfg):
        key = override.get_key_element()
        fixed.pop(key, None)
        swept.pop(key, None)
        value = override.value()
        if not override.is_sweep_override():
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
        elif isinstance(value, IntervalSweep):
            swept[key] = (str(override.input_line), [f"{key}={value.start}", f"{key}={value.end}"])
        else:
            swept[key] = (str(override.input_line), [f"{key}={v}" for v in override.sweep_string_iterator()])
    return list(fixed.values()), dict(swept.values())


def sweep_jobs(sweep_dir: Path, expected: list[Job] | None) -> list[Job]:
    """Every job of a sweep, by number: the numbered directories (`hydra.sweep.subdir` is the job number) with
    the overrides each recorded, and the expected jobs that have none yet (never started, or refused early)."""
    jobs = {job.number: job for job in expected or []}
    for directory in sweep_dir.iterdir():
        if directory.is_dir() and directory.name.isdigit():
            number, overrides = int(directory.name), recorded_overrides(directory)
            if overrides is not None:
                jobs[number] = Job(number, overrides, directory)
            else:
                jobs.setdefault(number, Job(number, [], directory))
    return [jobs[number] for number in sorted(jobs)]


def recorded_overrides(job_dir: Path) -> list[str] | None:
    """The overrides a job recorded when it started (`.hydra/overrides.yaml`); None before it did."""
    recorded = job_dir / HYDRA_DIR / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(recorded)] if recorded.exists() else None


def varying_keys(jobs: list[Job]) -> set[str]:
    """Override keys whose value differs between jobs: what tells the jobs of a sweep apart."""
    values = [dict(o.lstrip("+~").partition("=")[::2] for o in job.overrides) for job in jobs]
    keys = {key for v in values for key in v}
    return {key for key in keys if len({v.get(key) for v in values}) > 1}


def job_state(job: Job) -> str:
    """done, failed, running, started (a checkpoint, no process) or new."""
    if (job.directory / RESULTS_FILE).exists():
        return "done"
    if (job.directory / FAILED_FILE).exists():
        return "failed"
    if (job.directory / LOCK_FILE).exists():
        try:
            with FileLock(str(job.directory / LOCK_FILE), timeout=0):
                pass
        except Timeout:
            return "running"
    return "started" if (job.directory / LAST_FILE).exists() else "new"


def failure_line(job: Job) -> str:
    path = job.directory / FAILED_FILE
    if path.exists():
        return json.loads(path.read_text())["error"]
    return {
        "new": "not started",
        "started": "no result; last.pt holds its progress, a relaunch resumes it",
        "running": "still running in another process",
    }.get(job_state(job), f"no result ({job_state(job)})")


def stopped(job: Job) -> bool:
    """A stop signal ended the job after a checkpoint: a relaunch resumes it (`RunDir.record_failure`)."""
    path = job.directory / FAILED_FILE
    return path.exists() and json.loads(path.read_text()).get("stopped", False)


def objective(job: Job, metric: str, direction: str) -> float | None:
    """A finished job's best value of `metric` over its validation epochs (the largest when maximising), as an
    Optuna search scores the trial; None before it finished. NaN when any epoch's value is not finite: a run
    that diverged is a failed trial, not a score."""
    if job_state(job) != "done":
        return None
    values = [row[metric] for row in read_jsonl(job.directory / METRICS_FILE) if row.get(metric) is not None]
    if not values or not all(math.isfinite(value) for value in values):
        return math.nan
    return max(values) if direction == "maximize" else min(values)
