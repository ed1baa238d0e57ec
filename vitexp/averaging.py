"""Averages of the weights that train along with the model: `trainer.ema_decay` (an exponential moving
average, as timm's `ModelEmaV3`), each an `engine.Hook`.

The average is updated on the device after every optimizer step, without a host sync: a step skipped as
non-finite leaves it as it was. Each epoch also validates the average (`val_ema/*` in the metrics row),
keeps its best epoch's weights in `best_ema.pt`, and the test of those weights goes into results.json as
`test_ema`, beside the trained weights' `test`. Its state rides in `last.pt`, so a resumed run continues
the same average.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from vitexp import checkpoint
from vitexp.config import Config
from vitexp.engine import Hook, Trainer
from vitexp.metrics import evaluate

BEST_EMA_FILE = "best_ema.pt"


class EMA(Hook):
    def __init__(self, decay: float, warmup: bool) -> None:
        self.decay, self.warmup = decay, warmup
        self.model: nn.Module | None = None  # a copy of the trained model, made when training starts
        self.loaded: dict[str, Any] | None = None  # weights from a checkpoint, until there is a model to hold them
        self.best_acc, self.best_epoch = -1.0, -1

    def start(self, trainer: Trainer) -> None:
        """The average starts as the initial weights (or continues the checkpoint's)."""
        self.model = copy.deepcopy(trainer.model).eval().requires_grad_(False)
        if self.loaded is not None:
            self.model.load_state_dict(self.loaded)
            self.loaded = None

    def average(self, trainer: Trainer) -> nn.Module:
        if self.model is None:
            self.start(trainer)
        assert self.model is not None
        return self.model

    def after_step(self, trainer: Trainer) -> None:
        average = self.average(trainer)
        decay = self.decay
        if self.warmup:
            step = trainer.progress.step - 1  # steps before this one
            decay = min(decay, (1 + step) / (10 + step))
        keep = torch.where(trainer.step_finite, decay, 1.0)  # a skipped step: the average stays as it is
        averaged, current = list(average.parameters()), [p.detach() for p in trainer.model.parameters()]
        torch._foreach_mul_(averaged, keep)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - keep))
        for mine, theirs in zip(average.buffers(), trainer.model.buffers(), strict=True):
            mine.copy_(theirs)  # BatchNorm statistics are the trained model's, as timm does

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        average = self.average(trainer)
        val = self.evaluate(trainer, "val")
        row |= {f"val_ema/{key}": value for key, value in val.items()}
        if val["acc"] > self.best_acc and all(math.isfinite(v) for v in val.values()):
            self.best_acc, self.best_epoch = val["acc"], row["epoch"]
            state = {"model": average.state_dict(), "epoch": row["epoch"], "val": val, "config": trainer.config}
            trainer.save(trainer.run_dir / BEST_EMA_FILE, state)

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        if self.best_epoch < 1:
            return
        self.average(trainer).load_state_dict(checkpoint.load(trainer.run_dir / BEST_EMA_FILE)["model"])
        results |= {"test_ema": self.evaluate(trainer, "test"), "best_ema_epoch": self.best_epoch}

    def evaluate(self, trainer: Trainer, split: str) -> dict[str, float]:
        average = self.average(trainer)
        batches = trainer.feed.eval(split)
        return evaluate(average, batches, trainer.prepare_eval, trainer.num_classes, trainer.device, trainer.autocast)

    def state_dict(self) -> dict[str, Any]:
        weights = self.model.state_dict() if self.model is not None else self.loaded
        return {"weights": weights, "best_acc": self.best_acc, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded, self.model = state["weights"], None
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]


def averaging_hooks(cfg: Config) -> list[Hook]:
    """The weight averages a config asks for."""
    trainer = cfg.trainer
    return [EMA(trainer.ema_decay, trainer.ema_warmup)] if trainer.ema_decay > 0 else []
