"""The sweep report: `python -m vitexp.report <sweep_dir>` -> report.md, report.csv, runs.csv and plots.

One row per cell (`vitexp.cells`: the jobs that share every varying override but the seed), mean ± std
over seeds with their count, "(n=3)"; jobs that failed or never ran are shown as such, never dropped.
The jobs are read from the sweep directory, merged with the sweeper's own list where it has one (so a
grid's never-started jobs are listed), so a sweep made by any sweeper gets its report. The same report is
written at the end of every multirun by `vitexp.sweep.SweepCallback`.

report.csv has `model`, `aug` and `smoothing` always (the sweep's defaults where they do not vary, so
whatever reads the classic model × aug × smoothing report keeps its columns), then every other varying key
under its own name (`optim.lr`, `model.depth`), then the metrics: the validation accuracy of the best
epochs beside the test metrics, since the best cell is the one of the best validation accuracy (`best_by_val`;
test accuracy never selects). runs.csv has one row per job, whatever its state, with its images/s and, where
its results record them, where and when it trained: report.md says which jobs shared a host at the same
time, whose epoch times and images/s were measured under contention. report.md has the table of cells, then
what `cells.Layout` chooses by the keys that vary: an aug × smoothing pivot per model for a sweep over
no more than those three; otherwise a table sorted by the only varying key, or a pivot of the first two
keys for each combination of the others. The plots: `vitexp.report_plots`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitexp import search_report
from vitexp.cells import (
    CLASSIC,
    MAX_FACETS,
    UNKNOWN,
    Cell,
    Layout,
    Run,
    best_by_val,
    collect,
    facets,
    number,
    overlaps,
    show,
    sorted_values,
    tag,
)
from vitexp.jobs import Job, expected_jobs, sweep_jobs
from vitexp.report_plots import plot

METRICS = (("acc", "test acc"), ("f1", "macro F1"), ("ece", "ECE"), ("confidence", "confidence"), ("loss", "NLL"))
# The test accuracy of weight averages (`trainer.ema_decay`, `trainer.swa_start`): (column, results key)
AVERAGES = (("EMA test acc", "test_ema"), ("SWA test acc", "test_swa"))
# Probes of the embedding (`probe=svc|linear`): (test metric, column)
PROBE_METRICS = (("acc_svc", "SVC acc"), ("acc_linear", "linear probe acc"))


STATES = {"done": "finished", "new": "not started"}  # `jobs.job_state` as runs.csv words it
CONTENDED = "†"  # marks the timings of a cell some of whose jobs shared their host with another job


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± std with the number of seeds it rests on; one seed has no spread to show, so none is shown."""
    if not values:
        return "—"
    mean, n = statistics.fmean(values) * scale, len(values)
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f} (n={n})"


def accuracy(cell: Cell) -> str:
    return fmt(cell.values("acc"), scale=100)


def val_accuracy(cell: Cell, best: Cell | None) -> str:
    """The cell's validation accuracy, bold and starred on the cell selected by it."""
    shown = fmt(cell.values("acc", "best_val"), scale=100)
    return f"**{shown}** ★" if cell is best else shown


def csv_value(value: str) -> int | float | str | None:
    """A setting as report.csv holds it: a number as a number, an unknown value empty."""
    n = number(value)
    return None if value == UNKNOWN else value if n is None else n


@dataclass
class Report:
    sweep_dir: Path
    cells: list[Cell]
    markdown: Path
    csv: Path
    runs: Path
    plots: list[Path]  # PNG, each with its PDF beside it
    layout: Layout

    def keys(self) -> list[str]:
        return [*CLASSIC, *(key for key in self.layout.varying if key not in CLASSIC)]

    def columns(self) -> list[str]:
        keys = self.keys()
        metrics = ["val_acc_mean", "val_acc_std", "best_by_val"]
        metrics += [f"test_{key}_{stat}" for key, _ in METRICS for stat in ("mean", "std")]
        averages = [f"{key}_acc_{stat}" for _, key in averages_in(self.cells) for stat in ("mean", "std")]
        averages += [f"test_{key}_{stat}" for key, _ in probes_in(self.cells) for stat in ("mean", "std")]
        extra = [*(["stopped_epochs"] if stopped_early(self.cells) else [])]
        extra += ["selected_on_test"] if selected_on_test(self.cells) else []
        fixed = ["params", "epoch_time_s", "train_img_per_s", "data_wait", "status"]
        return [*keys, "seeds_done", "jobs", *metrics, *averages, *extra, *fixed]

    def table_rows(self) -> list[dict[str, Any]]:
        rows, best = [], best_by_val(self.cells)
        for cell in self.cells:
            row: dict[str, Any] = {key: csv_value(value) for key, value in cell.setting.items()}
            row["seeds_done"], row["jobs"] = len(cell.results), len(cell.jobs)
            row["val_acc_mean"], row["val_acc_std"] = cell.mean_std(cell.values("acc", "best_val"))
            row["best_by_val"] = cell is best
            for key, _ in METRICS:
                row[f"test_{key}_mean"], row[f"test_{key}_std"] = cell.mean_std(cell.values(key))
            for _, key in AVERAGES:
                row[f"{key}_acc_mean"], row[f"{key}_acc_std"] = cell.mean_std(average_accuracies(cell, key))
            for key, _ in PROBE_METRICS:
                row[f"test_{key}_mean"], row[f"test_{key}_std"] = cell.mean_std(cell.values(key))
            row["stopped_epochs"] = stop_epochs(cell)
            row["selected_on_test"] = cell.selected_on_test()
            row["params"] = cell.results[0]["params"] if cell.results else None
            row["epoch_time_s"] = cell.mean_result("epoch_time_s")
            row["train_img_per_s"] = cell.mean_result("train_img_per_s")
            row["data_wait"] = cell.mean_result("data_wait")
            row["status"] = cell.status
            rows.append({column: row[column] for column in self.columns()})
        return rows

    def run_columns(self) -> list[str]:
        metrics = [f"test_{key}" for key, _ in METRICS]
        timing = ["wall_time_s", "train_img_per_s", "host", "started_at", "finished_at", "overlapped_with"]
        return ["job", "run_dir", *self.keys(), "seed", "state", "best_val_acc", *metrics, "epochs_run", *timing]

    def run_rows(self) -> list[dict[str, Any]]:
        """runs.csv: one row per job, in job order, whatever its state."""
        runs = sorted(((run, cell) for cell in self.cells for run in cell.runs), key=lambda pair: pair[0].job.number)
        shared = overlaps([run for run, _ in runs])
        rows = []
        for run, cell in runs:
            results = run.results or {}
            row: dict[str, Any] = {"job": run.job.number, "run_dir": str(run.job.directory)}
            row |= {key: csv_value(cell.setting[key]) for key in self.keys()}
            row |= {"seed": csv_value(run.seed), "state": STATES.get(run.state, run.state)}
            row["best_val_acc"] = run.best_val_acc
            row |= {f"test_{key}": results.get("test", {}).get(key) for key, _ in METRICS}
            row["epochs_run"] = run.rows[-1]["epoch"] if run.rows else 0
            row |= {key: results.get(key) for key in ("wall_time_s", "train_img_per_s", "host")}
            row |= {key: timestamp(results.get(key)) for key in ("started_at", "finished_at")}
            row["overlapped_with"] = overlapped_with(shared.get(run.job.number))
            rows.append(row)
        return rows


def overlapped_with(others: list[int] | None) -> str | None:
    """runs.csv's word for the jobs one shared its host with: their numbers, "none", or empty when unknown."""
    if others is None:
        return None
    return " ".join(map(str, others)) or "none"


def timestamp(seconds: float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC time, readable in a spreadsheet."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def contended(cell: Cell, shared: dict[int, list[int]]) -> str:
    """`CONTENDED` when a job of the cell trained beside another on its host."""
    return CONTENDED if any(shared.get(job.number) for job in cell.jobs) else ""


def contention(runs: list[Run]) -> list[str]:
    """What report.md says of where the finished jobs trained: the groups of jobs that overlapped in time on one
    host, and how many jobs did not record it (results.json `host`, `started_at`, `finished_at`)."""
    finished = [run for run in runs if run.results is not None]
    windows = {run.job.number: window for run in finished if (window := run.window) is not None}
    shared = overlaps(finished)
    groups: list[str] = []
    seen: set[int] = set()
    for first in sorted(shared):
        if first in seen or not shared[first]:
            continue
        group: set[int] = set()
        todo = [first]
        while todo:  # every job linked to this one by a chain of overlaps
            if (job := todo.pop()) not in group:
                group.add(job)
                todo += shared[job]
        seen |= group
        starts = [windows[job][1] for job in group]  # the most jobs at once is reached as one starts
        most = max(sum(windows[o][1] <= start < windows[o][2] for o in group) for start in starts)
        groups.append(f"{windows[first][0]}: {', '.join(f'#{job}' for job in sorted(group))} (up to {most} at once)")
    out = []
    if groups:
        out += [
            "",
            f"**Jobs that trained at the same time on one host** ({CONTENDED}: their epoch times and images/s were "
            "measured while sharing it, so they do not compare with those of jobs that ran alone): "
            + "; ".join(groups),
        ]
    elif windows:
        out += ["", "No two jobs trained at the same time on one host: their epoch times and images/s compare."]
    if untimed := len(finished) - len(windows):
        out += [
            "",
            f"{untimed} of {len(finished)} finished jobs did not record where and when they trained (results.json "
            "`host`, `started_at`, `finished_at`): whether they shared a machine, which slows epochs and images/s, "
            "is unknown.",
        ]
    return out


def averages_in(cells: list[Cell]) -> list[tuple[str, str]]:
    """The weight averages some job tested (`AVERAGES`): the report shows their test accuracy beside the run's."""
    return [(name, key) for name, key in AVERAGES if any(key in r for cell in cells for r in cell.results)]


def average_accuracies(cell: Cell, key: str) -> list[float]:
    return [result[key]["acc"] for result in cell.results if key in result]


def probes_in(cells: list[Cell]) -> list[tuple[str, str]]:
    """The probes some job ran: the report shows their test accuracy beside the classifier's."""
    return [(key, name) for key, name in PROBE_METRICS if any(cell.values(key) for cell in cells)]


def stopped_early(cells: list[Cell]) -> bool:
    """Whether any job ran with early stopping (it records `stopped_epoch`, None when it never stopped)."""
    return any("stopped_epoch" in result for cell in cells for result in cell.results)


def stop_epochs(cell: Cell) -> str:
    """The epoch each finished job of the cell stopped at, "—" for one that ran all its epochs."""
    return ", ".join("—" if r.get("stopped_epoch") is None else str(r["stopped_epoch"]) for r in cell.results)


def selected_on_test(cells: list[Cell]) -> bool:
    """Whether any job chose its best epoch on the test split (`data.val_fraction=0`)."""
    return any(cell.selected_on_test() for cell in cells)


def markdown(layout: Layout, cells: list[Cell], search: list[str] | None = None) -> str:
    columns, averages, stopping, probes = layout.columns, averages_in(cells), stopped_early(cells), probes_in(cells)
    names = [*columns, "params", "val acc", *(name for _, name in METRICS), *(name for name, _ in averages)]
    names += [name for _, name in probes]
    names += [*(["stopped at epoch"] if stopping else []), "epoch time (s)", "img/s", "data wait", "seeds"]
    lines = ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    best, shared = best_by_val(cells), overlaps([run for cell in cells for run in cell.runs])
    for cell in cells:
        metrics = [
            fmt(cell.values(key), scale=100 if key == "acc" else 1, digits=2 if key == "acc" else 4)
            for key, _ in METRICS
        ]
        params = f"{cell.results[0]['params']:,}" if cell.results else "—"
        epoch, speed = cell.mean_result("epoch_time_s"), cell.mean_result("train_img_per_s")
        wait, mark = cell.mean_result("data_wait"), contended(cell, shared)
        values = [
            *(show(cell.setting[key]) for key in columns),
            params,
            val_accuracy(cell, best),
            *metrics,
            *(fmt(average_accuracies(cell, key), scale=100) for _, key in averages),
            *(fmt(cell.values(key), scale=100) for key, _ in probes),
            *([stop_epochs(cell) or "—"] if stopping else []),
            "—" if math.isnan(epoch) else f"{epoch:.1f}{mark}",
            "—" if math.isnan(speed) else f"{speed:,.0f}{mark}",
            "—" if math.isnan(wait) else f"{wait:.0%}",
            cell.status,
        ]
        lines.append("| " + " | ".join(values) + " |")
    intro = (
        "Mean ± std over seeds (n: the seeds finished; accuracy in %). Val acc is that of each seed's best epoch, "
        "which is tested; ★ marks the cell of the best val acc, the one to select (test accuracy selects nothing)."
    )
    out = ["# Sweep report", "", *(search or []), *(["## Every run", ""] if search else []), intro, "", *lines]
    label = {id(cell): ", ".join(f"{key}={show(cell.setting[key])}" for key in columns) for cell in cells}
    if best is not None:
        out += [
            "",
            f"**Best cell by validation accuracy** ★: {label[id(best)] or 'every job'} — "
            f"val acc {fmt(best.values('acc', 'best_val'), scale=100)}, test acc {accuracy(best)}",
        ]
    if selected_on_test(cells):
        chosen = [label[id(cell)] or "every job" for cell in cells if cell.selected_on_test()]
        out += [
            "",
            "**Selected on the test split** (`data.val_fraction=0`: the best epoch was chosen on the test images, "
            f"so their test numbers are optimistic, and they are no candidate for the best cell): {'; '.join(chosen)}",
        ]
    out += contention([run for cell in cells for run in cell.runs])
    if layout.line:
        out += by_key(cells, layout.line)
    if layout.pivot:
        out += pivots(cells, *layout.pivot)
    return "\n".join(out + seed_tables(layout, cells)) + "\n"


SEED_002_KEYS = ("model.pretrained", "model.attention")  # or a sweep with seed 002's model, resnet18_attn


def seed_tables(layout: Layout, cells: list[Cell]) -> list[str]:
    """The tables of the documents vitexp grew from, with their columns: seed 001's when a probe ran (validation
    loss, argmax and SVC accuracy, parameters), seed 002's when pretraining or attention varies or its model
    is in the sweep (model, pretrained, attention, epochs, test accuracy)."""
    out: list[str] = []
    done = [cell for cell in cells if cell.results]
    if any(cell.values("acc_svc") for cell in done):
        out += ["", "## Seed 001's table", "", "| " + " | ".join([*layout.columns, *SEED_001]) + " |"]
        out.append("|---" * (len(layout.columns) + len(SEED_001)) + "|")
        for cell in done:
            trained = [r["best_val"].get("l2", r["best_val"]["loss"]) for r in cell.results]  # the loss it trained
            values = [fmt(trained, digits=5), accuracy(cell), svc_accuracy(cell)]
            values.append(f"{cell.results[0]['params']:,}")
            out.append("| " + " | ".join([*(show(cell.setting[key]) for key in layout.columns), *values]) + " |")
    attention_model = any(cell.setting.get("model") == "resnet18_attn" for cell in cells)
    if attention_model or any(key in layout.varying for key in SEED_002_KEYS):
        out += ["", "## Seed 002's table", "", "| model | pretrained | attention | epochs | test accuracy |"]
        out.append("|---|---|---|---|---|")
        for cell in done:
            model = cell.results[0].get("config", {}).get("model", {"name": cell.setting.get("model", "—")})
            epochs = [r.get("stopped_epoch") or r["epochs"] for r in cell.results]
            attention = model.get("attention", "—")
            shown = [model["name"], str(model.get("pretrained", False)).lower(), attention, show_epochs(epochs)]
            out.append("| " + " | ".join([*shown, accuracy(cell)]) + " |")
    return out


SEED_001 = ["validation loss", "accuracy (argmax)", "accuracy (svc)", "model params"]


def svc_accuracy(cell: Cell) -> str:
    return fmt(cell.values("acc_svc"), scale=100)


def show_epochs(epochs: list[int]) -> str:
    return str(epochs[0]) if len(set(epochs)) == 1 else ", ".join(map(str, epochs))


def by_key(cells: list[Cell], key: str) -> list[str]:
    """The cells of a one-key sweep in the order of that key."""
    out = ["", f"## test accuracy (%) by {key}", "", f"| {key} | val acc | test acc | seeds |", "|---|---|---|---|"]
    by_value, best = {cell.setting[key]: cell for cell in cells}, best_by_val(cells)
    return out + [
        f"| {show(v)} | {val_accuracy(by_value[v], best)} | {accuracy(by_value[v])} | {by_value[v].status} |"
        for v in sorted_values(cells, key)
    ]


def pivots(cells: list[Cell], rows: str, cols: str, facet_keys: list[str]) -> list[str]:
    """Test accuracy with `rows` down and `cols` across: one table per combination of the facet keys' values;
    ★ marks the cell selected by validation accuracy."""
    out: list[str] = []
    parts, best = facets(cells, facet_keys), best_by_val(cells)
    for label, mine in parts[:MAX_FACETS]:
        col_values = sorted_values(mine, cols)
        out += [
            "",
            f"## {label + ': ' if label else ''}test accuracy (%), {rows} × {cols}",
            "",
            f"| {rows} | " + " | ".join(tag(cols, v) for v in col_values) + " |",
            "|---" * (1 + len(col_values)) + "|",
        ]
        for row in sorted_values(mine, rows):
            by_col = {c.setting[cols]: c for c in mine if c.setting[rows] == row}
            shown = [accuracy(c) + (" ★" if c is best else "") if (c := by_col.get(v)) else "—" for v in col_values]
            out.append(f"| {show(row)} | " + " | ".join(shown) + " |")
    if len(parts) > MAX_FACETS:
        out += ["", f"{len(parts) - MAX_FACETS} more combinations of {', '.join(facet_keys)}: see report.csv"]
    return out


def write_report(sweep_dir: Path, jobs: list[Job], defaults: dict[str, Any], aug: str | None = None) -> Report:
    layout, cells = collect(jobs, defaults)
    search, search_plots = search_report.write(sweep_dir)
    layout.sampled = bool(search)
    report = Report(
        sweep_dir, cells, sweep_dir / "report.md", sweep_dir / "report.csv", sweep_dir / "runs.csv", [], layout
    )
    report.markdown.write_text(markdown(layout, cells, search))
    write_csv(report.csv, report.table_rows(), report.columns())
    write_csv(report.runs, report.run_rows(), report.run_columns())
    report.plots = search_plots + plot(layout, cells, sweep_dir, aug)
    return report


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def sweep_defaults(config: DictConfig) -> dict[str, Any]:
    """The sweep's values for the report's columns before any job override."""
    choices = config.hydra.runtime.choices
    return {"model": choices.model, "aug": choices.aug, "smoothing": config.smoothing}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write report.md, report.csv and plots for a sweep directory.")
    parser.add_argument("sweep_dir", type=Path, help="e.g. multirun/2026-11-23/12-00-00")
    parser.add_argument("--aug", help="the aug whose reliability curves per smoothing to plot (default: the first)")
    args = parser.parse_args()
    config = OmegaConf.load(args.sweep_dir / "multirun.yaml")  # the sweep's config, written when it was launched
    assert isinstance(config, DictConfig)
    with _sweep_configs(config):
        jobs = sweep_jobs(args.sweep_dir, expected_jobs(config.hydra, args.sweep_dir))
    report = write_report(args.sweep_dir, jobs, sweep_defaults(config), args.aug)
    print(report.markdown.read_text())
    print(
        "wrote", report.markdown, report.csv, report.runs, *report.plots, *(p.with_suffix(".pdf") for p in report.plots)
    )


def _sweep_configs(config: DictConfig) -> contextlib.AbstractContextManager[Any]:
    """Hydra set up on the sweep's config directory, as when it was launched: a glob sweep lists its options."""
    from hydra import initialize_config_dir

    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file" and Path(source.path).is_dir():
            return initialize_config_dir(config_dir=source.path, version_base=None)
    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
