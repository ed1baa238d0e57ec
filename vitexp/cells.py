"""A sweep's cells: its jobs grouped by every override key that varies across the sweep, the seed aside.

Which keys vary is read from the jobs themselves, so a grid over `aug` × `smoothing`, an Optuna search
over `optim.lr` or a grid over `optim.lr` × `model.depth` all get cells, and `Layout` says how the report
shows them. `model`, `aug` and `smoothing` are known for every cell (from the sweep's defaults where no
job overrides them), so the classic report's columns are always there. Each job is a `Run` of its cell,
whatever its state, so the report can list every job (runs.csv) and tell which ones shared a machine.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from vitexp.config import GROUPS
from vitexp.jobs import Job, failure_line, job_state
from vitexp.logger import METRICS_FILE, RESULTS_FILE, MetricsFileError, read_jsonl

SEED = "seed"  # repeats a cell rather than making one
CLASSIC = ("model", "aug", "smoothing")  # the report's columns whether they vary or not
UNKNOWN = "?"  # a key's value in a job whose overrides were never recorded (it failed before it started)
SYMBOLS = {"smoothing": "ε"}
MAX_FACETS = 12  # pivots and heatmap panels shown; the cells of any more are in report.csv
FIRST = {"aug": "none"}  # shown before the key's other values: the baseline the others are read against
# Where and when a job trained, as its results.json records them (Unix seconds): jobs that overlap on one
# host measured their epoch times and images/s while sharing it
TIMING = ("host", "started_at", "finished_at")


@dataclass
class Run:
    """One job of a cell as its directory holds it: its state, its results once finished, its epochs so far."""

    job: Job
    state: str  # `jobs.job_state`: done, failed, running, started or new
    results: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, one row per epoch

    @property
    def seed(self) -> str:
        """The job's seed: its override, else what its results record ("" for a job that never ran)."""
        seed = overrides_of(self.job).get(SEED, (self.results or {}).get(SEED))
        return "" if seed is None else str(seed)

    @property
    def best_val_acc(self) -> float | None:
        """The best epoch's validation accuracy: the finished run's selection, else the best epoch so far."""
        if self.results is not None:
            return self.results.get("best_val", {}).get("acc")
        return max((row["val/acc"] for row in self.rows), default=None)

    @property
    def window(self) -> tuple[str, float, float] | None:
        """(host, start, end) of the training that finished the job, where its results record them (`TIMING`)."""
        found = [(self.results or {}).get(key) for key in TIMING]
        return None if None in found else (found[0], found[1], found[2])


@dataclass
class Cell:
    """The jobs that differ only in their seed."""

    setting: dict[str, str]  # key -> value, for the varying keys and CLASSIC
    runs: list[Run] = field(default_factory=list)

    @property
    def jobs(self) -> list[Job]:
        return [run.job for run in self.runs]

    @property
    def results(self) -> list[dict[str, Any]]:
        """The results of the finished seeds."""
        return [run.results for run in self.runs if run.results is not None]

    @property
    def curves(self) -> list[list[float]]:
        """Validation accuracy per epoch, per finished seed."""
        return [[row["val/acc"] for row in run.rows] for run in self.runs if run.results is not None]

    @property
    def problems(self) -> list[str]:
        """Why each job that did not finish has no result."""
        return [
            f"#{run.job.number} failed: {failure_line(run.job)}"
            if run.state == "failed"
            else f"#{run.job.number} {run.state}"
            for run in self.runs
            if run.results is None
        ]

    def values(self, key: str, part: str = "test") -> list[float]:
        """A metric of each finished seed that has it (a run of an older version may lack a newer one): of the
        test split, or of the validation split at the best epoch (`part="best_val"`)."""
        return [r[part][key] for r in self.results if key in r.get(part, {})]

    def selected_on_test(self) -> bool:
        """Whether a seed chose its best epoch on the test split (`data.val_fraction=0`): no validation to select by."""
        return any(r.get("selected_on_test") for r in self.results)

    def mean_std(self, values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def mean_result(self, key: str) -> float:
        """The mean of a top-level results.json figure over the seeds that have it (NaN if none does)."""
        return self.mean_std([r[key] for r in self.results if r.get(key) is not None])[0]

    @property
    def status(self) -> str:
        return f"{len(self.results)}/{len(self.jobs)}" + (f" ({'; '.join(self.problems)})" if self.problems else "")


@dataclass
class Layout:
    """How the report shows a sweep, decided by the keys that vary (in the order the sweep names them).

    A sweep over no more than model, aug and smoothing is shown as it always was: an aug × smoothing pivot
    per model, and calibration against smoothing. Any other sweep: one key is plotted against accuracy; two
    or more make a pivot of the first two, one per value of the others.
    """

    varying: list[str]
    sampled: bool = False  # the values were sampled (an Optuna search): each trial its own cell, no pivot

    @property
    def classic(self) -> bool:
        return set(self.varying) <= set(CLASSIC)

    @property
    def columns(self) -> list[str]:
        """The keys that name a cell in report.md."""
        return list(CLASSIC) if self.classic else self.varying

    @property
    def pivot(self) -> tuple[str, str, list[str]] | None:
        """The accuracy pivot's rows, columns and facets (one pivot per combination of their values)."""
        if self.sampled:
            return None
        if self.classic:
            return "aug", "smoothing", ["model"]
        return (self.varying[0], self.varying[1], self.varying[2:]) if len(self.varying) > 1 else None

    @property
    def line(self) -> str | None:
        """The key to plot accuracy against, when it is the only one that varies."""
        return self.varying[0] if len(self.varying) == 1 and not self.classic else None

    @property
    def curves(self) -> tuple[list[str], list[str]]:
        """Keys of the panels and of the lines of the validation curves: a line per smoothing ε (else per value
        of the last varying key), a panel per combination of the other varying keys."""
        if not self.varying:
            return [], []
        line = "smoothing" if "smoothing" in self.varying else self.varying[-1]
        return [key for key in self.varying if key != line], [line]

    @property
    def calibration(self) -> tuple[list[str], list[str]] | None:
        """Keys of the panels and of the lines of ECE against smoothing, when there is such a plot."""
        if self.classic:
            return ["model"], ["aug"]
        return ([], [k for k in self.varying if k != "smoothing"]) if "smoothing" in self.varying else None


def overrides_of(job: Job) -> dict[str, str]:
    return dict(o.lstrip("+~").partition("=")[::2] for o in job.overrides if not o.startswith("hydra."))


def collect(jobs: list[Job], defaults: dict[str, Any]) -> tuple[Layout, list[Cell]]:
    """Group jobs into cells by the keys that vary across them, the seed aside; cells in the order of their first job.

    `defaults` holds the sweep's value of each CLASSIC key before any override.
    """
    overrides = [overrides_of(job) for job in jobs]
    keys = list(dict.fromkeys(key for o in overrides for key in o))  # in the order the sweep names them
    base = {key: str(value) for key, value in defaults.items()}
    # a job that recorded no overrides (it failed before it started) may have had any value of any key
    settings = [
        base | (o if job.overrides else dict.fromkeys(keys, UNKNOWN)) for job, o in zip(jobs, overrides, strict=True)
    ]
    varying = [key for key in keys if key != SEED and len({s.get(key, UNKNOWN) for s in settings}) > 1]
    cells: dict[tuple[str, ...], Cell] = {}
    for job, setting in zip(jobs, settings, strict=True):
        shown = {key: setting.get(key, UNKNOWN) for key in [*CLASSIC, *varying]}
        cell = cells.setdefault(tuple(shown[key] for key in varying), Cell(shown))
        state = job_state(job)
        results = json.loads((job.directory / RESULTS_FILE).read_text()) if state == "done" else None
        cell.runs.append(Run(job, state, results, epoch_rows(job)))
    return Layout(varying), list(cells.values())


def epoch_rows(job: Job) -> list[dict[str, Any]]:
    """The job's metrics.jsonl rows; none where the file is unreadable (the job's failure says why)."""
    try:
        return read_jsonl(job.directory / METRICS_FILE)
    except MetricsFileError:
        return []


def best_by_val(cells: list[Cell]) -> Cell | None:
    """The cell with the highest mean validation accuracy of its best epochs: the one a paper may select, as
    selecting by test accuracy would tune on the test set. A cell that selected on the test split is no candidate."""
    candidates = [cell for cell in cells if cell.values("acc", "best_val") and not cell.selected_on_test()]
    return max(candidates, key=lambda cell: statistics.fmean(cell.values("acc", "best_val")), default=None)


def overlaps(runs: list[Run]) -> dict[int, list[int]]:
    """Job number -> the jobs that trained on the same host at the same time, for the runs that recorded
    where and when they trained (`Run.window`): their epoch times and images/s were measured under contention."""
    timed = [(run.job.number, *window) for run in runs if (window := run.window) is not None]
    return {
        number: [other for other, h, s, e in timed if other != number and h == host and s < end and start < e]
        for number, host, start, end in timed
    }


def number(value: str) -> int | float | None:
    """The value as a number, or None when it is not one."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return None


def order(value: str) -> tuple[int, float, str]:
    """Sort key: numbers numerically, before names in alphabetical order."""
    n = number(value)
    return (0, n, "") if n is not None else (1, 0.0, value)


def show(value: str) -> str:
    n = number(value)
    return f"{n:g}" if isinstance(n, float) else value


def tag(key: str, value: str) -> str:
    """A group's option names itself (`cutmix`); any other key is shown with its name (`optim.lr=0.001`)."""
    return value if key in GROUPS else f"{SYMBOLS.get(key, key)}={show(value)}"


def rank(key: str, value: str) -> tuple[bool, int, float, str]:
    """Sort key of a value of `key`: the key's baseline first (`FIRST`), then the others by `order`."""
    return (value != FIRST.get(key), *order(value))


def sorted_values(cells: list[Cell], key: str) -> list[str]:
    return sorted({cell.setting[key] for cell in cells}, key=lambda value: rank(key, value))


def facets(cells: list[Cell], keys: list[str]) -> list[tuple[str, list[Cell]]]:
    """The cells split by the values of `keys`, each part with its label, in sorted order; one part for no keys."""
    parts: dict[tuple[str, ...], list[Cell]] = {}
    for cell in cells:
        parts.setdefault(tuple(cell.setting[key] for key in keys), []).append(cell)
    return [
        (" ".join(tag(k, v) for k, v in zip(keys, values, strict=True)), parts[values])
        for values in sorted(parts, key=lambda values: [rank(k, v) for k, v in zip(keys, values, strict=True)])
    ]
