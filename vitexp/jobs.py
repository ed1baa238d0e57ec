"""A sweep's jobs: what Hydra's sweeper launches, and the state of each from the files in its directory.

The end-of-sweep summary, the report and the relaunch checks all read job states from the directories
(results.json, failed.json, the lock, last.pt), so they work whatever launched the jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from vitexp.checkpoint import LAST_FILE
from vitexp.logger import RESULTS_FILE
from vitexp.rundir import FAILED_FILE, LOCK_FILE


@dataclass
class Job:
    number: int
    overrides: list[str]
    directory: Path

    def varying(self, keys: set[str]) -> list[str]:
        """This job's overrides of `keys`: what tells it apart from the other jobs of its grid."""
        return [o for o in self.overrides if o.lstrip("+~").partition("=")[0] in keys]


def expand_jobs(hydra_cfg: DictConfig, sweep_dir: Path) -> list[Job]:
    """The jobs Hydra's basic sweeper will launch, in its order (so job numbers and directories match)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(hydra_cfg.overrides.task))
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [Job(n, list(overrides), sweep_dir / str(n)) for n, overrides in enumerate(batches[0] if batches else [])]


def varying_keys(jobs: list[Job]) -> set[str]:
    """Override keys whose value differs between jobs: what tells the jobs of a grid apart."""
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
