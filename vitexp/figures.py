"""The figures a person looks at after a run, drawn into its directory when it finishes: an `engine.Hook`.

Numbers in results.json say how good a run is; they do not say whether it still learned at the end, whether its
confidence can be trusted, or which classes it mixes up. So every run writes, next to its results:

- `curves.png`: train and validation loss and accuracy per epoch, and the learning rate (from metrics.jsonl);
- `reliability.png`: the test predictions' reliability diagram (accuracy against confidence in 15 bins, with
  the diagonal) over their confidence histogram, ECE in the title;
- `confusion.png`: the test confusion matrix with class names, readable at 37 Pets breeds (the figure grows
  with the classes; counts are written in the cells only up to `NUMBERED_CLASSES` classes);
- `figures.json`: the numbers behind them (curves, reliability bins and ECE, confusion matrix).

The images also go to the sinks (`Sink.log_media`), so W&B and TensorBoard show them. The test predictions
are computed again here, by one more pass over the test split with the weights the test used (the best epoch's,
loaded when `finish` runs) and the same evaluation path (`prepare_eval`, autocast), rather than threaded out
of the engine's metrics. The ECE is binned exactly as torchmetrics' `MulticlassCalibrationError(n_bins=15,
norm="l1")` bins it, so the title matches `results["test"]["ece"]`.

Matplotlib is imported only inside the drawing functions and used through its object API with the Agg
canvas (no pyplot), so a run needs no display and the caller's matplotlib backend is left alone. A figure
that cannot be drawn is logged as a warning and never costs the run its results.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.checkpoint import atomic_write
from vitexp.config import Config
from vitexp.engine import Hook, Trainer
from vitexp.logger import METRICS_FILE, read_jsonl, write_json

log = logging.getLogger("vitexp")

CURVES_FILE, RELIABILITY_FILE, CONFUSION_FILE, FIGURES_FILE = (
    "curves.png",
    "reliability.png",
    "confusion.png",
    "figures.json",
)
ECE_BINS = 15  # as the engine's MulticlassCalibrationError(n_bins=15)
NUMBERED_CLASSES = 15  # above this many classes the confusion matrix is colours only: numbers would not fit
CELL_INCHES = 0.3  # the least room a class gets in the confusion matrix (a 7-point name fits twice over)
CHAR_INCHES = 0.0075  # the width of a character of a tick label per point of font size (DejaVu Sans, about)
DPI = 100


# --- the numbers --------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_test(trainer: Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted classes, confidences) of the test split, as the engine's test computed them.

    The evaluated model (the best epoch's weights at `finish`), the evaluation crop and autocast of
    `Trainer.evaluate`; softmax in float32 and the top class, as `metrics.EvalMeter` feeds torchmetrics.
    """
    model = trainer.evaluated_model()[0]
    model.eval()
    labels, predictions, confidences = [], [], []
    for images, batch_labels in trainer.feed.eval("test"):
        images = images.to(trainer.device, non_blocking=True)
        with trainer.autocast():
            logits = model(trainer.prepare_eval(images))
        confidence, predicted = logits.float().softmax(dim=-1).max(dim=-1)
        labels.append(batch_labels.to(trainer.device))
        predictions.append(predicted)
        confidences.append(confidence)
    return (
        torch.cat(labels).cpu().numpy().astype(np.int64),
        torch.cat(predictions).cpu().numpy().astype(np.int64),
        torch.cat(confidences).cpu().numpy().astype(np.float32),
    )


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): rows are the true labels."""
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def reliability(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability bins of the top-class confidences and the expected calibration error (L1).

    Binned as torchmetrics does: bucket k holds confidences in [k/n, (k+1)/n), from float32 boundaries, and a
    confidence of exactly 1.0 is a bucket of its own; ECE = sum over buckets of |accuracy - confidence| x share.
    The returned `bins` are the `n_bins` drawn ones, the last one closed ([(n-1)/n, 1], those 1.0s included).
    """
    conf = torch.from_numpy(np.ascontiguousarray(confidences, dtype=np.float32))
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    bucket = torch.bucketize(conf, boundaries, right=True) - 1  # 0..n_bins (n_bins: exactly 1.0)
    total = max(len(conf), 1)

    def sums(index: torch.Tensor, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = torch.bincount(index, minlength=slots).double()
        conf_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, conf.double())
        hits = torch.from_numpy(np.asarray(correct, dtype=np.float64))
        acc_sum = torch.zeros(slots, dtype=torch.float64).scatter_add_(0, index, hits)
        return count.numpy(), conf_sum.numpy(), acc_sum.numpy()

    count, conf_sum, acc_sum = sums(bucket, n_bins + 1)
    ece = float(np.abs(acc_sum - conf_sum).sum() / total)
    count, conf_sum, acc_sum = sums(bucket.clamp(max=n_bins - 1), n_bins)
    edges = boundaries.double().tolist()
    bins = [
        {
            "lower": edges[k],
            "upper": edges[k + 1],
            "count": int(count[k]),
            "accuracy": acc_sum[k] / count[k] if count[k] else None,
            "confidence": conf_sum[k] / count[k] if count[k] else None,
        }
        for k in range(n_bins)
    ]
    accuracy = float(np.mean(correct)) if len(conf) else math.nan
    mean_confidence = float(conf.double().mean()) if len(conf) else math.nan
    return {"bins": bins, "ece": ece, "n": len(conf), "accuracy": accuracy, "confidence": mean_confidence}


def curves(rows: Sequence[dict[str, Any]], loss: str) -> dict[str, list[Any]]:
    """Per-epoch series from metrics.jsonl rows: the trained loss on train and val (`val/loss` is the NLL, or
    `val/l2` with `loss=l2`), accuracies (with the EMA's and SWA's where they ran) and the learning rate."""
    val_loss = "val/l2" if loss == "l2" else "val/loss"
    keys = ["train/loss", val_loss, "train/acc", "val/acc", "val_ema/acc", "val_swa/acc", "lr"]
    series: dict[str, list[Any]] = {"epoch": [row["epoch"] for row in rows]}
    for key in keys:
        if any(key in row for row in rows):
            series[key] = [row.get(key) for row in rows]
    return series


# --- the drawings -------------------------------------------------------------------------------------------
def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on its own Agg canvas: no pyplot, no global backend, no display.

    Margins are set by hand, not by a layout engine: constrained/tight layout would double the drawing time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=DPI))
    return path


def draw_curves(series: dict[str, list[Any]], loss: str, best_epoch: int | None, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(13, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.9, wspace=0.25)
    epochs = series["epoch"]
    marker = "o" if len(epochs) <= 30 else None

    def line(ax: Any, key: str, label: str, **style: Any) -> None:
        if key in series:
            points = [(e, v) for e, v in zip(epochs, series[key], strict=True) if v is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], marker=marker, markersize=3, label=label, **style)

    val_loss = "val/l2" if loss == "l2" else "val/loss"
    line(ax_loss, "train/loss", "train (soft targets)")
    line(ax_loss, val_loss, "val")
    line(ax_acc, "train/acc", "train (top class of the target)")
    line(ax_acc, "val/acc", "val")
    line(ax_acc, "val_ema/acc", "val, EMA", linestyle="--")
    line(ax_acc, "val_swa/acc", "val, SWA", linestyle="--")
    line(ax_lr, "lr", "learning rate", color="tab:green")
    loss_name = "L2 loss" if loss == "l2" else "cross-entropy"
    ax_loss.set(xlabel="epoch", ylabel=loss_name, title=f"loss ({'L2' if loss == 'l2' else 'val: NLL'})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (ax_loss, ax_acc):
        if best_epoch is not None and best_epoch >= 1:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.legend(fontsize=7)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save(fig, path)


def draw_reliability(rel: dict[str, Any], path: Path) -> Path:
    fig = new_figure(5.5, 6.5)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.2])
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.09, top=0.94, hspace=0.08)
    bins = rel["bins"]
    lefts = [b["lower"] for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    ax.bar(
        [b["lower"] for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    ax.bar(  # the gap between confidence and accuracy
        [b["lower"] for b in filled],
        [b["confidence"] - b["accuracy"] for b in filled],
        bottom=[b["accuracy"] for b in filled],
        width=width,
        align="edge",
        fill=False,
        hatch="///",
        edgecolor="tab:red",
        linewidth=0.5,
        label="gap to the bin's mean confidence",
    )
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(f"test reliability: ECE {rel['ece']:.4f} ({len(bins)} bins, {rel['n']} images)")
    ax.legend(loc="best", fontsize=8)
    shares = [b["count"] / max(rel["n"], 1) for b in bins]
    hist.bar(lefts, shares, width=width, align="edge", color="tab:grey", edgecolor="black", linewidth=0.5)
    for key, colour, name in (("accuracy", "tab:blue", "accuracy"), ("confidence", "tab:red", "mean confidence")):
        hist.axvline(rel[key], color=colour, linestyle="--", linewidth=1, label=f"{name} {rel[key]:.3f}")
    hist.set(xlabel="confidence (top-class probability)", ylabel="share of images")
    hist.legend(loc="best", fontsize=7)
    return save(fig, path)


def draw_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Colour: each true class's share of predictions (rows sum to 1), so rare classes show as clearly as common
    ones; counts in the cells up to `NUMBERED_CLASSES` classes. Each class gets `CELL_INCHES` at least, and the
    margins fit the longest class name, so 37 Pets breeds stay readable."""
    k = len(class_names)
    names = [str(name) for name in class_names]
    font = 8 if k <= NUMBERED_CLASSES else 7
    side = max(4.0, CELL_INCHES * k)  # the matrix itself
    labels = 0.45 + CHAR_INCHES * font * max(map(len, names), default=1)  # tick labels and the axis label
    width, height = labels + side + 1.1, labels + side + 0.45  # + colour bar; + title
    fig = new_figure(width, height)
    ax = fig.add_axes((labels / width, labels / height, side / width, side / height))
    bar = fig.add_axes(((labels + side + 0.2) / width, labels / height, 0.15 / width, side / height))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ticks = list(range(k))
    ax.set_xticks(ticks, names, rotation=90 if max(map(len, names), default=0) > 2 else 0, fontsize=font)
    ax.set_yticks(ticks, names, fontsize=font)
    ax.set(xlabel="predicted class", ylabel="true class")
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else math.nan
    ax.set_title(f"test confusion matrix: accuracy {accuracy:.4f} ({total} images)", fontsize=10)
    if k <= NUMBERED_CLASSES:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=font, color=colour)
    fig.colorbar(image, cax=bar, label="share of the true class")
    return save(fig, path)


# --- the hook -----------------------------------------------------------------------------------------------
class RunFigures(Hook):
    """Draws curves.png, reliability.png and confusion.png into the run directory at `finish`, writes their
    numbers to figures.json and sends the images to the sinks. Keeps no state: a resumed run draws them once,
    when it finishes."""

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            paths = write_figures(trainer, results)
        except Exception as err:  # a figure must never cost a finished run its results.json
            log.warning("could not draw the run's figures: %s: %s", type(err).__name__, err, exc_info=True)
            return
        trainer.sinks.log_media({}, {f"figures/{path.stem}": path for path in paths})
        names = ", ".join(path.name for path in paths)
        log.info("figures: %s in %.2fs", names, time.perf_counter() - start)


def write_figures(trainer: Trainer, results: dict[str, Any]) -> list[Path]:
    """Compute the figures' numbers, write figures.json and the three PNGs; return the PNGs' paths."""
    run_dir, loss = trainer.run_dir, trainer.cfg.loss
    labels, predictions, confidences = predict_test(trainer)
    matrix = confusion_matrix(labels, predictions, trainer.num_classes)
    rel = reliability(confidences, predictions == labels)
    test = results.get("test", {})
    if "ece" in test and abs(rel["ece"] - test["ece"]) > 1e-4:  # a non-deterministic device kernel, say
        log.warning("figures: the test pass drawn has ECE %.5f, the one tested %.5f", rel["ece"], test["ece"])
    series = curves(read_jsonl(run_dir / METRICS_FILE), loss)
    class_names = [str(name) for name in trainer.splits.class_names]
    data = {
        "curves": series,
        "best_epoch": results.get("best_epoch"),
        "reliability": rel,
        "confusion": {"classes": class_names, "matrix": matrix.tolist(), "rows": "true", "columns": "predicted"},
    }
    write_json(run_dir / FIGURES_FILE, data)
    return [
        draw_curves(series, loss, results.get("best_epoch"), run_dir / CURVES_FILE),
        draw_reliability(rel, run_dir / RELIABILITY_FILE),
        draw_confusion(matrix, class_names, run_dir / CONFUSION_FILE),
    ]


def figure_hooks(cfg: Config) -> list[Hook]:
    """The run's figures: drawn for every run."""
    return [RunFigures()]
