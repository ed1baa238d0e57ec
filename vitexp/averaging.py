"""Averages of the weights that train along with the model, each an `engine.Hook`: `trainer.ema_decay` (an
exponential moving average, as timm's `ModelEmaV3`) and `trainer.swa_start` (stochastic weight averaging,
with torch's `AveragedModel`, `SWALR`'s learning rate and `update_bn`).

The EMA:
The average is updated on the device after every optimizer step, without a host sync: a step skipped as
non-finite leaves it as it was. Each epoch also validates the average (`val_ema/*` in the metrics row),
keeps its best epoch's weights in `best_ema.pt`, and the test of those weights goes into results.json as
`test_ema`, beside the trained weights' `test`. Its state rides in `last.pt`, so a resumed run continues
the same average.

SWA averages the weights at the end of each epoch from `swa_start` on, equally; from that epoch the learning
rate anneals to `swa_lr` (if set) as `SWALR` would, per step. Each averaged epoch validates the average
(`val_swa/*`), after recomputing BatchNorm statistics for models that have them, and the run's test of the
final average goes into results.json as `test_swa`, its weights into `swa.pt`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from vitexp import checkpoint
from vitexp.config import Config
from vitexp.engine import Hook, Trainer

BEST_EMA_FILE = "best_ema.pt"
SWA_FILE = "swa.pt"


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
        return trainer.evaluate_model(self.average(trainer), split)

    def state_dict(self) -> dict[str, Any]:
        weights = self.model.state_dict() if self.model is not None else self.loaded
        return {"weights": weights, "best_acc": self.best_acc, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded, self.model = state["weights"], None
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]


class SWA(Hook):
    def __init__(self, start_epoch: int, swa_lr: float | None, anneal_epochs: int, peak_lr: float) -> None:
        self.start_epoch, self.anneal_epochs = start_epoch, anneal_epochs
        self.lr_factor = None if swa_lr is None else swa_lr / peak_lr  # relative, so param groups keep their ratios
        self.averaged: AveragedModel | None = None  # made when training starts
        self.loaded: dict[str, Any] | None = None  # the average from a checkpoint, until there is a model for it

    def start(self, trainer: Trainer) -> None:
        self.averaged = AveragedModel(trainer.model)
        if self.loaded is not None:
            self.averaged.load_state_dict(self.loaded)
            self.loaded = None
        if self.lr_factor is not None:
            scheduler = trainer.scheduler  # the schedule's factors, then SWALR's from the start epoch's first step
            first = sum(trainer.epoch_steps[: self.start_epoch - 1])
            anneal = sum(trainer.epoch_steps[self.start_epoch - 1 : self.start_epoch - 1 + self.anneal_epochs])
            scheduler.lr_lambdas = [self.swa_schedule(f, first, anneal) for f in scheduler.lr_lambdas]

    def swa_schedule(self, factor: Callable[[int], float], first: int, anneal: int) -> Callable[[int], float]:
        """`factor` before step `first`; then a cosine from its value there to `lr_factor` over `anneal` steps."""
        assert self.lr_factor is not None
        start, target = factor(first), self.lr_factor

        def swa(step: int) -> float:
            if step < first:
                return factor(step)
            done = min(1.0, (step - first + 1) / anneal) if anneal else 1.0
            alpha = (1 - math.cos(math.pi * done)) / 2
            return (1 - alpha) * start + alpha * target

        return swa

    @property
    def snapshots(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if row["epoch"] < self.start_epoch or self.averaged is None:
            return
        self.averaged.update_parameters(trainer.model)
        self.update_batchnorm(trainer)
        val = trainer.evaluate_model(self.averaged.module, "val")
        row |= {f"val_swa/{key}": value for key, value in val.items()} | {"swa_epochs": self.snapshots}

    def update_batchnorm(self, trainer: Trainer) -> None:
        """BatchNorm statistics of the averaged weights, over the training images as evaluation sees them
        (no augmentation: the augmentation's random draws stay the training's, so resume stays exact)."""
        assert self.averaged is not None
        if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in self.averaged.modules()):
            images = (trainer.prepare_eval(batch.to(trainer.device)) for batch, _ in trainer.feed.eval("train"))
            with trainer.autocast():
                update_bn(images, self.averaged)

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        if self.snapshots == 0:  # training ended (early) before the start epoch
            return
        assert self.averaged is not None
        state = {"model": self.averaged.module.state_dict(), "epochs": self.snapshots, "config": trainer.config}
        trainer.save(trainer.run_dir / SWA_FILE, state)
        results |= {"test_swa": trainer.evaluate_model(self.averaged.module, "test"), "swa_epochs": self.snapshots}

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict() if self.averaged is not None else self.loaded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded, self.averaged = state["averaged"], None


def averaging_hooks(cfg: Config) -> list[Hook]:
    """The weight averages a config asks for."""
    trainer = cfg.trainer
    hooks: list[Hook] = [EMA(trainer.ema_decay, trainer.ema_warmup)] if trainer.ema_decay > 0 else []
    if trainer.swa_start is not None:
        hooks.append(SWA(trainer.swa_start, trainer.swa_lr, trainer.swa_anneal_epochs, cfg.optim.lr))
    return hooks
