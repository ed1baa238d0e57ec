"""A sweep's cells: its jobs grouped by every override key that varies across the sweep, the seed aside.

Which keys vary is read from the jobs themselves, so a grid over `aug` × `smoothing`, an Optuna search
over `optim.lr` or a grid over `optim.lr` × `model.depth` all get cells, and `Layout` says how the report
shows them. `model`, `aug` and `smoothing` are known for every cell (from the sweep's defaults where no
job overrides them), so the classic report's columns are always there.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from vitexp.config import GROUPS
from vitexp.jobs import Job, failure_line, job_state
from vitexp.logger import METRICS_FILE, RESULTS_FILE, read_jsonl

SEED = "seed"  # repeats a cell rather than making one
CLASSIC = ("model", "aug", "smoothing")  # the report's columns whether they vary or not
UNKNOWN = "?"  # a key's value in a job whose overrides were never recorded (it failed before it started)
SYMBOLS = {"smoothing": "ε"}
MAX_FACETS = 12  # pivots and heatmap panels shown; the cells of any more are in report.csv


@dataclass
class Cell:
    """The jobs that differ only in their seed."""

    setting: dict[str, str]  # key -> value, for the varying keys and CLASSIC
    jobs: list[Job] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)  # val accuracy per epoch, per finished seed
    problems: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        """A test metric of each finished seed that has it (a run of an older version may lack a newer one)."""
        return [r["test"][key] for r in self.results if key in r["test"]]

    def mean_std(self, values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def mean_result(self, key: str) -> float:
        """The mean of a top-level results.json figure over the seeds that have it (NaN if none does)."""
        return self.mean_std([r[key] for r in self.results if r.get(key) is not None])[0]

    def label(self, keys: list[str]) -> str:
        return " ".join(tag(key, self.setting[key]) for key in keys)

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
        if self.classic:
            return "aug", "smoothing", ["model"]
        return (self.varying[0], self.varying[1], self.varying[2:]) if len(self.varying) > 1 else None

    @property
    def line(self) -> str | None:
        """The key to plot accuracy against, when it is the only one that varies."""
        return self.varying[0] if len(self.varying) == 1 and not self.classic else None

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
        cell.jobs.append(job)
        state = job_state(job)
        if state == "done":
            cell.results.append(json.loads((job.directory / RESULTS_FILE).read_text()))
            cell.curves.append([row["val/acc"] for row in read_jsonl(job.directory / METRICS_FILE)])
        elif state == "failed":
            cell.problems.append(f"#{job.number} failed: {failure_line(job)}")
        else:
            cell.problems.append(f"#{job.number} {state}")
    return Layout(varying), list(cells.values())


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


def sorted_values(cells: list[Cell], key: str) -> list[str]:
    return sorted({cell.setting[key] for cell in cells}, key=order)


def facets(cells: list[Cell], keys: list[str]) -> list[tuple[str, list[Cell]]]:
    """The cells split by the values of `keys`, each part with its label, in sorted order; one part for no keys."""
    parts: dict[tuple[str, ...], list[Cell]] = {}
    for cell in cells:
        parts.setdefault(tuple(cell.setting[key] for key in keys), []).append(cell)
    return [
        (" ".join(tag(k, v) for k, v in zip(keys, values, strict=True)), parts[values])
        for values in sorted(parts, key=lambda values: [order(v) for v in values])
    ]
