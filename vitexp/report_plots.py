"""The sweep report's plots, chosen by the sweep's `Layout`: accuracy over the swept keys, calibration and
confidence against smoothing with the reliability curves per smoothing, and validation accuracy per epoch.
Each function writes one PNG and returns its path."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from vitexp.cells import MAX_FACETS, Cell, Layout, facets, number, show, sorted_values

AXIS_NAMES = {"smoothing": "label smoothing ε"}


def plot(layout: Layout, cells: list[Cell], out_dir: Path, aug: str | None = None) -> list[Path]:
    """The plots the layout calls for; the reliability curves per smoothing are of `aug` (default: the first)."""
    import matplotlib

    matplotlib.use("Agg")
    if not cells:  # no job has started: nothing to draw
        return []
    paths = []
    if layout.pivot:
        paths.append(heatmap(cells, *layout.pivot, out_dir / "accuracy_heatmap.png"))
    if layout.line:
        paths.append(accuracy_line(cells, layout.line, out_dir / f"accuracy_vs_{layout.line}.png"))
    if layout.calibration:  # how smoothing moves calibration, and the confidence that moves it
        paths.append(calibration(cells, *layout.calibration, out_dir / "ece_vs_smoothing.png"))
        paths.append(calibration(cells, *layout.calibration, out_dir / "confidence_vs_smoothing.png", "confidence"))
        chosen = [c for c in cells if c.setting.get("aug") == (aug or sorted_values(cells, "aug")[0])]
        if any(reliability_bins(c) for c in chosen):  # the runs drew their figures (figures.json)
            paths.append(
                reliability_by_smoothing(chosen, layout.calibration[0], out_dir / "reliability_by_smoothing.png")
            )
    paths.append(val_curves(cells, layout.columns, out_dir / "val_curves.png"))
    return paths


def heatmap(cells: list[Cell], rows: str, cols: str, facet_keys: list[str], path: Path) -> Path:
    """Mean test accuracy over rows × cols, one panel per combination of the facet keys' values."""
    parts = facets(cells, facet_keys)[:MAX_FACETS]
    fig, axes = _panels(len(parts))
    for ax, (label, mine) in zip(axes, parts, strict=True):
        row_values, col_values = sorted_values(mine, rows), sorted_values(mine, cols)
        grid = [[math.nan] * len(col_values) for _ in row_values]
        for c in mine:
            accuracy = c.mean_std(c.values("acc"))[0] * 100
            grid[row_values.index(c.setting[rows])][col_values.index(c.setting[cols])] = accuracy
        image = ax.imshow(grid, cmap="viridis")
        ax.set(
            xticks=range(len(col_values)),
            xticklabels=[show(v) for v in col_values],
            yticks=range(len(row_values)),
            yticklabels=[show(v) for v in row_values],
            xlabel=AXIS_NAMES.get(cols, cols),
            ylabel=AXIS_NAMES.get(rows, rows),
            title=f"{label}: test accuracy (%)" if label else "test accuracy (%)",
        )
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "—" if math.isnan(value) else f"{value:.1f}", ha="center", va="center", color="w")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


def accuracy_line(cells: list[Cell], key: str, path: Path) -> Path:
    """Mean ± std test accuracy against the one varying key: a numeric axis (log when it spans decades) or names."""
    import matplotlib.pyplot as plt

    values = sorted_values(cells, key)
    by_value = {cell.setting[key]: cell for cell in cells}
    stats = [by_value[v].mean_std(by_value[v].values("acc")) for v in values]
    numbers = [n for v in values if (n := number(v)) is not None]
    numeric = len(numbers) == len(values)
    xs = numbers if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, [m * 100 for m, _ in stats], yerr=[s * 100 for _, s in stats], marker="o", capsize=3)
    if numeric and min(numbers) > 0 and max(numbers) >= 100 * min(numbers):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [show(v) for v in values])
    name = AXIS_NAMES.get(key, key)
    ax.set(xlabel=name, ylabel="test accuracy (%)", title=f"test accuracy vs {name} (mean ± std over seeds)")
    return _save(fig, path)


CALIBRATION_METRICS = {"ece": ("test ECE", "calibration"), "confidence": ("mean test confidence", "confidence")}


def calibration(
    cells: list[Cell], panel_keys: list[str], line_keys: list[str], path: Path, metric: str = "ece"
) -> Path:
    """Test ECE (or mean confidence) against label smoothing, a line per combination of `line_keys`, a panel per
    one of `panel_keys`."""
    axis, title = CALIBRATION_METRICS[metric]
    parts = facets(cells, panel_keys)[:MAX_FACETS]
    fig, axes = _panels(len(parts))
    for ax, (label, mine) in zip(axes, parts, strict=True):
        for line, line_cells in facets(mine, line_keys):
            points = sorted(
                (eps, c.mean_std(c.values(metric))[0])
                for c in line_cells
                if (eps := number(c.setting["smoothing"])) is not None
            )
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=line or "all jobs")
        ax.set(xlabel=AXIS_NAMES["smoothing"], ylabel=axis, title=f"{label}: {title}" if label else title)
        ax.legend()
    return _save(fig, path)


def reliability_bins(cell: Cell) -> list[dict[str, float]]:
    """The reliability diagram of a cell, its seeds pooled: (confidence, accuracy, count) per non-empty bin,
    from each finished job's figures.json."""
    pooled: dict[int, list[float]] = {}
    for job in cell.jobs:
        path = job.directory / "figures.json"
        if not (job.directory / "results.json").exists() or not path.exists():
            continue
        for k, b in enumerate(json.loads(path.read_text())["reliability"]["bins"]):
            if b["count"]:
                sums = pooled.setdefault(k, [0.0, 0.0, 0.0])
                sums[0] += b["confidence"] * b["count"]
                sums[1] += b["accuracy"] * b["count"]
                sums[2] += b["count"]
    return [{"confidence": c / n, "accuracy": a / n, "count": n} for _, (c, a, n) in sorted(pooled.items())]


def reliability_by_smoothing(cells: list[Cell], panel_keys: list[str], path: Path) -> Path:
    """Reliability curves of the test predictions, one line per label smoothing ε, a panel per model: smoothing
    moves the curve from below the diagonal (overconfident) toward or past it."""
    parts = facets(cells, panel_keys)[:MAX_FACETS]
    fig, axes = _panels(len(parts))
    aug = show(cells[0].setting.get("aug", ""))
    for ax, (label, mine) in zip(axes, parts, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for value in sorted_values(mine, "smoothing"):
            for cell in (c for c in mine if c.setting["smoothing"] == value):
                if bins := reliability_bins(cell):
                    xs, ys = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
                    ax.plot(xs, ys, marker="o", markersize=3, label=f"ε={show(value)}")
        title = f"{label}, aug={aug}" if label else f"aug={aug}"
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}: reliability")
        ax.legend(fontsize=7)
    return _save(fig, path)


def val_curves(cells: list[Cell], keys: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in cells:
        if c.curves:
            length = min(len(curve) for curve in c.curves)
            mean = [statistics.fmean(curve[i] for curve in c.curves) for i in range(length)]
            ax.plot(range(1, length + 1), mean, label=c.label(keys) or "all jobs")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per cell (mean over seeds)")
    if ax.lines:  # no cell has finished yet: nothing to label
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _panels(n: int) -> tuple[Any, list[Any]]:
    """A figure with `n` panels of 5 × 4 inches, at most four to a row."""
    import matplotlib.pyplot as plt

    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
