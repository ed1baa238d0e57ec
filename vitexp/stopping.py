"""Early stopping (`trainer.early_stop_patience`): end training once the validation metric has not improved for
that many epochs, as Lightning's `EarlyStopping` does; an `engine.Hook`.

The test still runs on the best epoch's weights (`best.pt`), so stopping only saves the epochs that would not
have been chosen. The counter rides in `last.pt`: a run preempted after it decided to stop finishes without
training again, and one preempted before continues counting where it was. `results.json` gets
`stopped_epoch` (None when every epoch ran).
"""

from __future__ import annotations

import math
from typing import Any

from vitexp.config import EARLY_STOP_METRICS, Config
from vitexp.engine import Hook, Trainer


class EarlyStopping(Hook):
    def __init__(self, patience: int, metric: str, min_delta: float) -> None:
        self.patience, self.metric, self.min_delta = patience, metric, min_delta
        self.sign = 1.0 if EARLY_STOP_METRICS[metric] == "max" else -1.0  # compare as "higher is better"
        self.best: float | None = None
        self.epochs_without_improvement = 0
        self.stopped_epoch: int | None = None

    def start(self, trainer: Trainer) -> None:
        if self.stopped_epoch is not None:
            trainer.finish_early = self.reason()

    def reason(self) -> str:
        patience, delta = self.patience, self.min_delta
        return f"early stopping: {self.metric} did not improve by more than {delta:g} for {patience} epochs"

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return self.best is None or self.sign * (value - self.best) > self.min_delta

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        value = row[self.metric]
        if self.improved(value):
            self.best, self.epochs_without_improvement = value, 0
        else:
            self.epochs_without_improvement += 1
        row["epochs_without_improvement"] = self.epochs_without_improvement
        if self.epochs_without_improvement >= self.patience and row["epoch"] < trainer.epochs:
            self.stopped_epoch = row["epoch"]
            trainer.finish_early = self.reason()

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        results["stopped_epoch"] = self.stopped_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.epochs_without_improvement, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.epochs_without_improvement = state["best"], state["bad"]
        self.stopped_epoch = state["stopped_epoch"]


def stopping_hooks(cfg: Config) -> list[Hook]:
    """Early stopping, if the config asks for it."""
    trainer = cfg.trainer
    if trainer.early_stop_patience == 0:
        return []
    return [EarlyStopping(trainer.early_stop_patience, trainer.early_stop_metric, trainer.early_stop_min_delta)]
