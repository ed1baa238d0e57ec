"""Helpers for tests that launch real multirun sweeps of tiny models on digits."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, TINY, run_train

SWEEP = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "model.depth=1"]


def sweep(sweep_dir: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_train("-m", *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}", timeout=timeout)


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "-m", *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"]


def logged_epochs(metrics: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def wait_for_epochs(metrics: Path, epochs: int, timeout: float = 300) -> None:
    """Block until a running job has logged `epochs` epochs (it is then mid-training)."""
    deadline = time.monotonic() + timeout
    while len(logged_epochs(metrics)) < epochs and time.monotonic() < deadline:
        time.sleep(0.1)


def job_results(sweep_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}


def report_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "report.csv").open() as file:
        return list(csv.DictReader(file))


def assert_report_means(sweep_dir: Path, cells: int) -> None:
    """report.csv has one row per cell whose mean equals the mean of its jobs' test accuracies."""
    rows = report_rows(sweep_dir)
    assert len(rows) == cells
    results = list(job_results(sweep_dir).values())
    for row in rows:
        mine = [r for r in results if r["choices"]["aug"] == row["aug"] and r["smoothing"] == float(row["smoothing"])]
        assert mine and float(row["test_acc_mean"]) == statistics.fmean(r["test"]["acc"] for r in mine)
        assert float(row["data_wait"]) == statistics.fmean(r["data_wait"] for r in mine)
        assert int(row["seeds_done"]) == len(mine)
    for plot in ("accuracy_heatmap.png", "ece_vs_smoothing.png", "val_curves.png"):
        assert (sweep_dir / plot).read_bytes()[:4] == b"\x89PNG"
