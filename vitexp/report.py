"""The sweep report: `python -m vitexp.report <sweep_dir>` -> report.md, report.csv and PNG plots.

One row per grid cell (the job's overrides without the seed), mean ± std over seeds; jobs that failed
or never ran are shown as such, never dropped. The same report is written at the end of every
multirun by `vitexp.sweep.SweepCallback`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitexp.jobs import Job, expand_jobs, failure_line, job_state, varying_keys
from vitexp.logger import METRICS_FILE, RESULTS_FILE, read_jsonl

METRICS = (("acc", "test acc"), ("f1", "macro F1"), ("ece", "ECE"), ("loss", "NLL"))


@dataclass
class Cell:
    """A grid cell: the jobs that differ only in their seed."""

    model: str
    aug: str
    smoothing: float
    other: str
    jobs: list[Job] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)  # val accuracy per epoch, per finished seed
    problems: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r["test"][key] for r in self.results]

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


def parse_overrides(job: Job) -> dict[str, str]:
    return dict(o.lstrip("+~").partition("=")[::2] for o in job.overrides if not o.startswith("hydra."))


def collect(jobs: list[Job], defaults: dict[str, Any]) -> list[Cell]:
    """Group jobs into cells by model, aug, smoothing and any other override that varies across the sweep."""
    overrides = [parse_overrides(job) for job in jobs]
    other_keys = sorted(varying_keys(jobs) - {"model", "aug", "smoothing", "seed"})
    cells: dict[tuple[str, str, float, str], Cell] = {}
    for job, values in zip(jobs, overrides, strict=True):
        setting = defaults | values
        other = " ".join(f"{k}={values[k]}" for k in other_keys if k in values)
        key = (str(setting["model"]), str(setting["aug"]), float(setting["smoothing"]), other)
        cell = cells.setdefault(key, Cell(*key))
        cell.jobs.append(job)
        state = job_state(job)
        if state == "done":
            cell.results.append(json.loads((job.directory / RESULTS_FILE).read_text()))
            cell.curves.append([row["val/acc"] for row in read_jsonl(job.directory / METRICS_FILE)])
        elif state == "failed":
            cell.problems.append(f"#{job.number} failed: {failure_line(job)}")
        else:
            cell.problems.append(f"#{job.number} {state}")
    return list(cells.values())


def fmt(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


@dataclass
class Report:
    sweep_dir: Path
    cells: list[Cell]
    markdown: Path
    csv: Path
    plots: list[Path]

    def table_rows(self) -> list[dict[str, Any]]:
        rows = []
        for cell in self.cells:
            row: dict[str, Any] = {
                "model": cell.model,
                "aug": cell.aug,
                "smoothing": cell.smoothing,
                "other": cell.other,
                "seeds_done": len(cell.results),
                "jobs": len(cell.jobs),
            }
            for key, _ in METRICS:
                row[f"test_{key}_mean"], row[f"test_{key}_std"] = cell.mean_std(cell.values(key))
            row["params"] = cell.results[0]["params"] if cell.results else None
            row["epoch_time_s"] = cell.mean_result("epoch_time_s")
            row["data_wait"] = cell.mean_result("data_wait")
            row["status"] = cell.status
            rows.append(row)
        return rows

    def log_to_wandb(self, config: DictConfig) -> None:
        """Log the table and plots as one `report` run in the sweep's W&B group."""
        import wandb

        from vitexp.config import LoggerConfig
        from vitexp.logger import RunLogger, sweep_group

        logger_cfg = OmegaConf.to_object(config.logger)
        assert isinstance(logger_cfg, LoggerConfig)
        logger_cfg.group = logger_cfg.group or sweep_group(config.hydra, self.sweep_dir)
        logger = RunLogger(logger_cfg, self.sweep_dir, {}, name="report", job_type="report")
        if logger.wandb_run is None:
            return
        rows = self.table_rows()
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        logger.wandb_run.log({"sweep_report": table} | {p.stem: wandb.Image(str(p)) for p in self.plots})
        logger.finish(exit_code=0)


def markdown(cells: list[Cell]) -> str:
    show_other = any(cell.other for cell in cells)  # a column for other varying overrides, when there are any
    lines = [
        "| model | aug | smoothing | "
        + ("other | " if show_other else "")
        + "params | "
        + " | ".join(name for _, name in METRICS)
        + " | epoch time (s) | data wait | seeds |",
        "|---" * (7 + show_other + len(METRICS)) + "|",
    ]
    for cell in cells:
        metrics = [
            fmt(*cell.mean_std(cell.values(key)), scale=100 if key == "acc" else 1, digits=2 if key == "acc" else 4)
            for key, _ in METRICS
        ]
        params = f"{cell.results[0]['params']:,}" if cell.results else "—"
        epoch, wait = cell.mean_result("epoch_time_s"), cell.mean_result("data_wait")
        lines.append(
            f"| {cell.model} | {cell.aug} | {cell.smoothing:g} | "
            + (f"{cell.other} | " if show_other else "")
            + f"{params} | "
            + " | ".join(metrics)
            + f" | {'—' if math.isnan(epoch) else f'{epoch:.1f}'} | {'—' if math.isnan(wait) else f'{wait:.0%}'}"
            + f" | {cell.status} |"
        )
    out = ["# Sweep report", "", "Test metrics, mean ± std over seeds (accuracy in %).", "", *lines]
    for model in sorted({c.model for c in cells}):
        mine = [c for c in cells if c.model == model and not c.other]
        smoothings = sorted({c.smoothing for c in mine})
        augs = sorted({c.aug for c in mine})
        if not mine:
            continue
        out += [
            "",
            f"## {model}: test accuracy (%), aug × smoothing",
            "",
            "| aug | " + " | ".join(f"ε={s:g}" for s in smoothings) + " |",
            "|---" * (1 + len(smoothings)) + "|",
        ]
        for aug in augs:
            by_eps = {c.smoothing: c for c in mine if c.aug == aug}
            cells_text = [
                fmt(*by_eps[s].mean_std(by_eps[s].values("acc")), scale=100) if s in by_eps else "—" for s in smoothings
            ]
            out.append(f"| {aug} | " + " | ".join(cells_text) + " |")
    return "\n".join(out) + "\n"


def plot(cells: list[Cell], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = sorted({c.model for c in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [c for c in cells if c.model == model]
        augs, eps = sorted({c.aug for c in mine}), sorted({c.smoothing for c in mine})
        grid = [[math.nan] * len(eps) for _ in augs]
        for c in mine:
            grid[augs.index(c.aug)][eps.index(c.smoothing)] = c.mean_std(c.values("acc"))[0] * 100
        image = ax.imshow(grid, cmap="viridis")
        ax.set(
            xticks=range(len(eps)),
            xticklabels=[f"{e:g}" for e in eps],
            yticks=range(len(augs)),
            yticklabels=augs,
            xlabel="label smoothing ε",
            title=f"{model}: test accuracy (%)",
        )
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "—" if math.isnan(value) else f"{value:.1f}", ha="center", va="center", color="w")
        fig.colorbar(image, ax=ax)
    paths.append(_save(fig, out_dir / "accuracy_heatmap.png"))

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for aug in sorted({c.aug for c in cells if c.model == model}):
            line = sorted(
                (c.smoothing, c.mean_std(c.values("ece"))[0]) for c in cells if c.model == model and c.aug == aug
            )
            ax.plot([e for e, _ in line], [v for _, v in line], marker="o", label=aug)
        ax.set(xlabel="label smoothing ε", ylabel="test ECE", title=f"{model}: calibration")
        ax.legend()
    paths.append(_save(fig, out_dir / "ece_vs_smoothing.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cells:
        if c.curves:
            length = min(len(curve) for curve in c.curves)
            mean = [statistics.fmean(curve[i] for curve in c.curves) for i in range(length)]
            ax.plot(range(1, length + 1), mean, label=f"{c.model} {c.aug} ε={c.smoothing:g} {c.other}".strip())
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per cell (mean over seeds)")
    if ax.lines:  # no cell has finished yet: nothing to label
        ax.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, out_dir / "val_curves.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(sweep_dir: Path, jobs: list[Job], defaults: dict[str, Any]) -> Report:
    cells = collect(jobs, defaults)
    report = Report(sweep_dir, cells, sweep_dir / "report.md", sweep_dir / "report.csv", [])
    report.markdown.write_text(markdown(cells))
    rows = report.table_rows()
    with report.csv.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report.plots = plot(cells, sweep_dir)
    return report


def sweep_defaults(config: DictConfig) -> dict[str, Any]:
    """The sweep's values for the report's columns before any job override."""
    choices = config.hydra.runtime.choices
    return {"model": choices.model, "aug": choices.aug, "smoothing": config.smoothing}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write report.md, report.csv and plots for a sweep directory.")
    parser.add_argument("sweep_dir", type=Path, help="e.g. multirun/2026-11-23/12-00-00")
    args = parser.parse_args()
    config = OmegaConf.load(args.sweep_dir / "multirun.yaml")
    assert isinstance(config, DictConfig)
    report = write_report(args.sweep_dir, expand_jobs(config.hydra, args.sweep_dir), sweep_defaults(config))
    print(report.markdown.read_text())
    print("wrote", report.markdown, report.csv, *report.plots)


if __name__ == "__main__":
    main()
