"""Early stopping: when it stops (max and min metrics, min_delta), what the run reports, and that its count and
its decision survive a stop and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY
from vitexp import engine, run
from vitexp.config import ConfigError, validate
from vitexp.engine import Hook, Trainer
from vitexp.logger import read_jsonl
from vitexp.run import RunIdentity
from vitexp.stopping import EarlyStopping

BASE = [*TINY, "data=digits", "data.batch_size=128", "sched.warmup_epochs=0.5", "trainer.epochs=6"]
SCRIPTED_ACC = [0.5, 0.6, 0.6, 0.55, 0.7, 0.8]  # no improvement after epoch 2: patience 2 stops after epoch 4


class ScriptedMetric(Hook):
    """Replaces each epoch's validation accuracy by a scripted one, so when to stop is known in advance."""

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        row["val/acc"] = SCRIPTED_ACC[row["epoch"] - 1]


@pytest.mark.parametrize(
    ("metric", "delta", "values", "improved"),
    [
        ("val/acc", 0.0, [0.5, 0.6, 0.6, 0.61], [True, True, False, True]),
        ("val/acc", 0.05, [0.5, 0.54, 0.56, 0.6], [True, False, True, False]),
        ("val/loss", 0.0, [1.0, 0.9, 0.95, float("nan"), 0.8], [True, True, False, False, True]),
    ],
)
def test_improvement_is_by_more_than_min_delta_in_the_metric_direction(metric, delta, values, improved) -> None:
    stopping, seen = EarlyStopping(10, metric, delta), []
    for value in values:
        seen.append(stopping.improved(value))
        if seen[-1]:
            stopping.best = value
    assert seen == improved


def run_with_script(make_cfg, directory: Path, *overrides: str) -> dict[str, Any]:
    cfg = make_cfg(*BASE, "trainer.early_stop_patience=2", *overrides)
    original = run.stopping_hooks
    hooks = [ScriptedMetric(), *original(validate(cfg))]
    run.stopping_hooks = lambda typed: hooks  # type: ignore[assignment]
    try:
        return run.run(cfg, directory, RunIdentity({}))
    finally:
        run.stopping_hooks = original


def test_a_run_stops_after_patience_epochs_and_tests_its_best_epoch(make_cfg, tmp_path: Path) -> None:
    results = run_with_script(make_cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert [row["epochs_without_improvement"] for row in rows] == [0, 0, 1, 2]
    assert results["stopped_epoch"] == 4 and results["epochs"] == 6
    assert results["best_epoch"] <= 4 and set(results["test"]) >= {"acc", "loss"}


def test_no_stop_reports_none_and_off_is_the_default(make_cfg, tmp_path: Path) -> None:
    results = run_with_script(make_cfg, tmp_path / "patient", "trainer.early_stop_patience=4", "trainer.epochs=5")
    assert results["stopped_epoch"] is None and len(read_jsonl(tmp_path / "patient" / "metrics.jsonl")) == 5
    assert validate(make_cfg()).trainer.early_stop_patience == 0
    with pytest.raises(ConfigError, match="trainer.early_stop_metric='val/f1' is not allowed: expected val/acc or"):
        validate(make_cfg("trainer.early_stop_metric=val/f1"))


def test_the_count_and_the_decision_survive_a_resume(make_cfg, tmp_path: Path, stop_once_at, monkeypatch) -> None:
    straight = run_with_script(make_cfg, tmp_path / "straight")
    stop_once_at(35)
    assert run_with_script(make_cfg, tmp_path / "resumed") == {}
    resumed = run_with_script(make_cfg, tmp_path / "resumed")
    assert resumed["stopped_epoch"] == 4 and resumed["test"] == straight["test"]

    # decided, then interrupted before the test: the rerun finishes without training another epoch
    finish, failed = engine.Trainer.finish, {"done": False}

    def interrupted_finish(self, sinks):
        if not failed["done"]:
            failed["done"] = True
            raise KeyboardInterrupt
        return finish(self, sinks)

    monkeypatch.setattr(engine.Trainer, "finish", interrupted_finish)
    with pytest.raises(KeyboardInterrupt):
        run_with_script(make_cfg, tmp_path / "interrupted")
    again = run_with_script(make_cfg, tmp_path / "interrupted")
    assert again["stopped_epoch"] == 4 and again["test"] == straight["test"]
    assert len(read_jsonl(tmp_path / "interrupted" / "metrics.jsonl")) == 4
