"""The sweep report's plots, chosen by the sweep's `Layout`: accuracy over the swept keys, calibration and
confidence against smoothing with the reliability curves per smoothing, and validation accuracy per epoch.

Each figure is drawn by a function that returns it (so tests can read what it shows) and saved by `plot` as
PNG, for the report and the logger sinks, and as PDF beside it, for a paper. Every axis and colour bar is
labelled, spreads are over seeds (error bars, shaded bands), and `aug=none`, the baseline, comes first.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from vitexp.cells import MAX_FACETS, Cell, Layout, best_by_val, facets, number, show, sorted_values

AXIS_NAMES = {"smoothing": "label smoothing ε"}
DARK_BACKGROUND = 0.179  # relative luminance under which white text contrasts more than black (WCAG)


def plot(layout: Layout, cells: list[Cell], out_dir: Path, aug: str | None = None) -> list[Path]:
    """Save the figures the layout calls for; return the PNGs (a PDF of each is beside it)."""
    return [save(figure, out_dir, name) for name, figure in figures(layout, cells, aug).items()]


def figures(layout: Layout, cells: list[Cell], aug: str | None = None) -> dict[str, Any]:
    """File name (no suffix) -> figure, for the plots the layout calls for; the reliability curves per
    smoothing are of `aug` (default: the first, `none` where it ran)."""
    if not cells:  # no job has started: nothing to draw
        return {}
    drawn = {}
    if layout.pivot:
        drawn["accuracy_heatmap"] = heatmap(cells, *layout.pivot)
    if layout.line:
        drawn[f"accuracy_vs_{layout.line}"] = accuracy_line(cells, layout.line)
    if layout.calibration:  # how smoothing moves calibration, and the confidence that moves it
        drawn["ece_vs_smoothing"] = calibration(cells, *layout.calibration)
        drawn["confidence_vs_smoothing"] = calibration(cells, *layout.calibration, "confidence")
        chosen = [c for c in cells if c.setting.get("aug") == (aug or sorted_values(cells, "aug")[0])]
        if any(reliability_bins(c) for c in chosen):  # the runs drew their figures (figures.json)
            drawn["reliability_by_smoothing"] = reliability_by_smoothing(chosen, layout.calibration[0])
    drawn["val_curves"] = val_curves(cells, *layout.curves)
    return drawn


def text_colour(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever reads better on a background of this colour (by its relative luminance)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "white" if luminance < DARK_BACKGROUND else "black"


def heatmap(cells: list[Cell], rows: str, cols: str, facet_keys: list[str]) -> Any:
    """Mean test accuracy over rows × cols, one panel per combination of the facet keys' values; the cell
    selected by validation accuracy is outlined."""
    from matplotlib.patches import Rectangle

    best = best_by_val(cells)
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
                colour = "black" if math.isnan(value) else text_colour(image.cmap(image.norm(value)))
                shown = "—" if math.isnan(value) else f"{value:.1f}"
                ax.text(j, i, shown, ha="center", va="center", color=colour)
        if best is not None and any(c is best for c in mine):
            i, j = row_values.index(best.setting[rows]), col_values.index(best.setting[cols])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
            ax.set_title(f"{ax.get_title()}\n(red: the best validation accuracy)")
        fig.colorbar(image, ax=ax, label="test accuracy (%)")
    return fig


def accuracy_line(cells: list[Cell], key: str) -> Any:
    """Mean ± std test accuracy against the one varying key: a numeric axis (log when it spans decades) or names."""
    plt = _pyplot()
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
    return fig


CALIBRATION_METRICS = {"ece": ("test ECE", "calibration"), "confidence": ("mean test confidence", "confidence")}


def calibration(cells: list[Cell], panel_keys: list[str], line_keys: list[str], metric: str = "ece") -> Any:
    """Test ECE (or mean confidence) against label smoothing, mean ± std over seeds as error bars, a line per
    combination of `line_keys`, a panel per one of `panel_keys`."""
    axis, title = CALIBRATION_METRICS[metric]
    parts = facets(cells, panel_keys)[:MAX_FACETS]
    fig, axes = _panels(len(parts))
    for ax, (label, mine) in zip(axes, parts, strict=True):
        for line, line_cells in facets(mine, line_keys):
            points = sorted(
                (eps, *c.mean_std(c.values(metric)))
                for c in line_cells
                if (eps := number(c.setting["smoothing"])) is not None
            )
            xs, means, stds = ([p[k] for p in points] for k in range(3))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=line or "all jobs")
        title_text = f"{title} (mean ± std over seeds)"
        ax.set(xlabel=AXIS_NAMES["smoothing"], ylabel=axis, title=f"{label}: {title_text}" if label else title_text)
        ax.legend()
    return fig


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


def reliability_by_smoothing(cells: list[Cell], panel_keys: list[str]) -> Any:
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
    return fig


def curve_band(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and std over seeds per epoch, of the seeds that reached it (one that stopped early ends sooner)."""
    epochs = [[curve[i] for curve in curves if i < len(curve)] for i in range(max(map(len, curves)))]
    return [statistics.fmean(e) for e in epochs], [statistics.stdev(e) if len(e) > 1 else 0.0 for e in epochs]


def val_curves(cells: list[Cell], panel_keys: list[str], line_keys: list[str]) -> Any:
    """Validation accuracy per epoch as small multiples: a panel per combination of `panel_keys` on shared axes,
    a line per one of `line_keys` (the same colour in every panel), mean over seeds in a band of ± std."""
    from matplotlib.ticker import MaxNLocator

    parts = facets(cells, panel_keys)[:MAX_FACETS]
    lines = [label for label, _ in facets(cells, line_keys)]
    colours = _colours(len(lines))
    fig, axes = _panels(len(parts), share=True)
    for ax, (label, mine) in zip(axes, parts, strict=True):
        for line, line_cells in facets(mine, line_keys):
            for c in (c for c in line_cells if c.curves):
                mean, std = curve_band(c.curves)
                epochs, colour = range(1, len(mean) + 1), colours[lines.index(line)]
                ax.plot(epochs, [100 * m for m in mean], color=colour, label=line or "all jobs")
                low, high = ([100 * (m + sign * s) for m, s in zip(mean, std, strict=True)] for sign in (-1, 1))
                ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=label or "all jobs")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:  # no cell of the panel has finished yet: nothing to label
            ax.legend(fontsize=7)
    fig.suptitle("validation accuracy per epoch (mean ± std over seeds)")
    return fig


def _colours(n: int) -> list[Any]:
    """`n` distinct colours in order: the default cycle, or a sequential map when it has too few."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    return [_pyplot().get_cmap("viridis")(i / (n - 1)) for i in range(n)]


def _pyplot() -> Any:
    """pyplot without a display: the report is written on headless nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, share: bool = False) -> tuple[Any, list[Any]]:
    """A figure with `n` panels of 5 × 4 inches, at most four to a row; `share`: one x and one y axis for all."""
    plt = _pyplot()
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    figsize = (5 * ncols, 4 * nrows)
    fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, sharex=share, sharey=share)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def save(fig: Any, out_dir: Path, name: str) -> Path:
    """Write the figure as `name`.png and `name`.pdf (fonts embedded as TrueType, editable); return the PNG."""
    import matplotlib

    plt = _pyplot()
    fig.tight_layout()
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=110)
    # Embedding TrueType fonts subsets them with fontTools, which logs a few hundred INFO lines per sweep
    # (through the root logger Hydra sets to INFO); its warnings still show.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        fig.savefig(out_dir / f"{name}.pdf")
    plt.close(fig)
    return png
