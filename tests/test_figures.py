"""The per-run figures: a real digits run draws them from its own test predictions, their numbers agree with
results.json (accuracy, torchmetrics' ECE), they reach the sinks, and a broken figure never costs a run its
results."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_confusion_matrix

from tests.conftest import TINY
from vitexp import figures, run
from vitexp.config import validate
from vitexp.data import build_splits
from vitexp.logger import Sink, read_jsonl
from vitexp.pets import PETS_CLASSES
from vitexp.run import RunIdentity

DIGITS = [*TINY, "data=digits", "data.batch_size=128"]
PNGS = ("curves.png", "reliability.png", "confusion.png")


class Recorder(Sink):
    """A sink that keeps what `log_media` was given."""

    def __init__(self) -> None:
        self.images: dict[str, Path] = {}

    def log_media(self, tables: Mapping[str, Sequence[dict[str, Any]]], images: Mapping[str, Path]) -> None:
        self.images.update(images)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_a_digits_run_draws_its_figures_from_its_test_predictions(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(run.Sinks, "build", classmethod(lambda cls, *args, **kwargs: cls([recorder])))
    backend = matplotlib.rcParams._get_backend_or_none()
    cfg = make_cfg(*DIGITS, "trainer.epochs=3")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="vitexp"):
        results = run.run(cfg, run_dir, RunIdentity({}))

    assert matplotlib.rcParams._get_backend_or_none() == backend  # the caller's backend is left alone
    assert recorder.images == {f"figures/{name.removesuffix('.png')}": run_dir / name for name in PNGS}
    sizes = {name: pixels(run_dir / name).shape[:2] for name in PNGS}
    assert sizes["curves.png"] == (380, 1300) and sizes["reliability.png"] == (650, 550)
    height, width = sizes["confusion.png"]
    assert width >= 4 * figures.DPI and height >= 4 * figures.DPI
    for name in PNGS:
        image = pixels(run_dir / name)
        drawn = (image < 200).any(axis=2).mean()  # not white: lines, bars, cells, text
        assert 0.01 < drawn < 0.9, name

    data = json.loads((run_dir / "figures.json").read_text())
    test_images = len(build_splits(validate(cfg).data).test)
    matrix = np.array(data["confusion"]["matrix"])
    assert matrix.shape == (10, 10) and data["confusion"]["classes"] == [str(d) for d in range(10)]
    assert matrix.sum() == test_images == data["reliability"]["n"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(results["test"]["acc"], abs=1e-6)
    assert data["reliability"]["ece"] == pytest.approx(results["test"]["ece"], abs=1e-6)
    bins = data["reliability"]["bins"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == test_images
    assert bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    correct = sum(b["accuracy"] * b["count"] for b in bins if b["count"])
    assert correct == pytest.approx(np.trace(matrix))

    rows = read_jsonl(run_dir / "metrics.jsonl")
    curves = data["curves"]
    assert curves["epoch"] == [1, 2, 3] == [row["epoch"] for row in rows]
    for key in ("train/loss", "val/loss", "train/acc", "val/acc", "lr"):
        assert curves[key] == [row[key] for row in rows]
    assert data["best_epoch"] == results["best_epoch"]
    assert "figures: curves.png, reliability.png, confusion.png in" in caplog.text


def test_ece_bins_as_torchmetrics_does_saturated_and_boundary_confidences_included() -> None:
    generator = torch.Generator().manual_seed(0)
    n, k = 1000, 7
    probs = (torch.randn(n, k, generator=generator) * 1.5).softmax(dim=-1)
    labels = torch.randint(0, k, (n,), generator=generator)
    probs[:50] = torch.eye(k)[0]  # a confidence of exactly 1.0 (a saturated softmax): torchmetrics' own bucket,
    labels[:10] = 0  # right for 10 of them, so less accurate than confident there...
    probs[50:450] = 0.06 / (k - 1)  # ...while the rest of the last drawn bin, [14/15, 1), is more accurate:
    probs[50:450].scatter_(1, labels[50:450, None], 0.94)  # merging the two would change the ECE
    probs[450:480] = 0.0
    probs[450:480, 1] = torch.linspace(0, 1, 16)[3]  # exactly on a bin boundary (float32)
    probs[450:480, 2] = 1 - probs[450:480, 1]
    confidence, predicted = probs.max(dim=-1)
    assert (confidence == 1).sum() == 50
    rel = figures.reliability(confidence.numpy(), (predicted == labels).numpy())
    expected = multiclass_calibration_error(probs, labels, num_classes=k, n_bins=15, norm="l1")
    assert rel["ece"] == pytest.approx(expected.item(), abs=2e-6)  # torchmetrics sums in float32
    merged = sum(abs(b["accuracy"] - b["confidence"]) * b["count"] for b in rel["bins"] if b["count"]) / n
    assert abs(merged - rel["ece"]) > 0.01  # the case above tells the two apart
    assert sum(b["count"] for b in rel["bins"]) == n and rel["bins"][-1]["count"] >= 450  # the 1.0s drawn last
    assert rel["accuracy"] == pytest.approx((predicted == labels).double().mean().item())
    one = figures.reliability(np.array([0.95], dtype=np.float32), np.array([True]))
    assert [b["count"] for b in one["bins"]].count(0) == 14 and one["ece"] == pytest.approx(0.05, abs=1e-6)


def test_confusion_matrix_rows_are_true_labels() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (300,), generator=generator)
    predicted = torch.where(torch.rand(300, generator=generator) < 0.7, labels, torch.randint(0, 5, (300,)))
    mine = figures.confusion_matrix(labels.numpy(), predicted.numpy(), 5)
    assert (mine == multiclass_confusion_matrix(predicted, labels, num_classes=5).numpy()).all()


def test_37_breeds_get_a_larger_figure_without_numbers_in_the_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts: dict[str, list[str]] = {}  # what each drawing writes into its axes, besides tick labels and titles
    original = figures.save

    def keep_texts(fig: Any, path: Path) -> Path:
        texts[path.name] = [text.get_text() for ax in fig.axes for text in ax.texts]
        return original(fig, path)

    monkeypatch.setattr(figures, "save", keep_texts)
    rng = np.random.default_rng(0)
    big = np.diag(rng.integers(20, 40, 37)) + rng.integers(0, 3, (37, 37))
    small = big[:10, :10]
    figures.draw_confusion(big, PETS_CLASSES, tmp_path / "pets.png")
    figures.draw_confusion(small, PETS_CLASSES[:10], tmp_path / "ten.png")
    pets_h, pets_w = pixels(tmp_path / "pets.png").shape[:2]
    ten_h, ten_w = pixels(tmp_path / "ten.png").shape[:2]
    cell = figures.CELL_INCHES * figures.DPI
    assert pets_w > 37 * cell and pets_h > 37 * cell and pets_w > ten_w and pets_h > ten_h
    assert texts["pets.png"] == []
    assert sorted(map(int, texts["ten.png"])) == sorted(int(v) for v in small.flat if v)


def test_a_figure_that_fails_leaves_the_run_its_results(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Path:
        raise RuntimeError("no ink")

    monkeypatch.setattr(figures, "draw_confusion", broken)
    run_dir = tmp_path / "run"
    results = run.run(make_cfg(*DIGITS, "trainer.epochs=1"), run_dir, RunIdentity({}))
    assert math.isfinite(results["test"]["acc"]) and (run_dir / "results.json").exists()
    assert not (run_dir / "confusion.png").exists() and (run_dir / "figures.json").exists()
    assert "could not draw the run's figures: RuntimeError: no ink" in (run_dir / "train.log").read_text()
