"""The learning-rate range test (Leslie Smith): where to set `optim.lr` before spending a sweep on it.

`python -m vitexp.lr_find <train.py overrides> [lr_find.min_lr=1e-7 lr_find.max_lr=10 lr_find.steps=100 ...]`
trains the composed config's model with the learning rate growing exponentially from `min_lr` to `max_lr`,
one optimizer step per rate, through the same `Trainer` loop as a run (`Trainer.train_steps`), and stops
early once the smoothed loss diverges. `optim.lr` and the `sched` group are replaced by that ramp. It
writes `lr_find.json` and `lr_find.png` into a directory of its own (`lr_find/<date>/<time>` or
`lr_find.dir`, which must be new or empty) and nothing else: no checkpoint, no logger sink, no run touched.
The suggestion is the middle of the sharpest downward slope of the loss, not its lowest point, where
the rate is already about to blow training up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.cli import compose_train_config, parse_train_tool_args, run_tool
from vitexp.config import ConfigError
from vitexp.engine import Hook, NonFiniteError, Trainer

log = logging.getLogger("vitexp")
PREFIX = "lr_find."


@dataclass
class LrFindConfig:
    min_lr: float = 1e-7  # the first learning rate tried
    max_lr: float = 10.0  # the last one, reached at step `steps` unless the loss diverges first
    steps: int = 100  # optimizer steps, one learning rate each, spaced evenly on a log scale
    smoothing: float = 0.98  # EMA beta of the loss (bias-corrected); 0: the raw per-step loss
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this x its lowest value
    dir: str | None = None  # output directory (new or empty); None: lr_find/<date>/<time>

    def rules(self) -> list[tuple[str, bool, str]]:
        return [
            ("min_lr", self.min_lr > 0, "a float > 0"),
            ("max_lr", self.max_lr > self.min_lr, f"a float > lr_find.min_lr={self.min_lr:g}"),
            ("steps", self.steps >= 3, "an integer >= 3"),
            ("smoothing", 0 <= self.smoothing < 1, "a float in [0, 1)"),
            ("diverge_factor", self.diverge_factor > 1, "a float > 1"),
        ]

    def lrs(self) -> np.ndarray:
        return self.min_lr * (self.max_lr / self.min_lr) ** (np.arange(self.steps) / (self.steps - 1))


def parse_args(argv: Sequence[str]) -> tuple[LrFindConfig, list[str]]:
    """Split `lr_find.key=value` items (checked into an LrFindConfig) from the overrides for train.py's config."""
    return parse_train_tool_args(argv, PREFIX, LrFindConfig, "the LR finder", "lr_find.dir")


class RangeTest(Hook):
    """Records the loss of every step at its learning rate; stops the trainer when the smoothed loss diverges."""

    def __init__(self, cfg: LrFindConfig) -> None:
        self.cfg, self.planned = cfg, cfg.lrs()
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.average, self.diverged = 0.0, False

    def after_step(self, trainer: Trainer) -> None:
        loss = trainer.train_means.compute()["loss"] if bool(trainer.step_finite) else math.inf
        trainer.train_means.reset()
        beta = self.cfg.smoothing
        self.average = beta * self.average + (1 - beta) * loss
        smooth = self.average / (1 - beta ** (len(self.raw) + 1))
        if not math.isfinite(smooth):
            self.diverged = trainer.stop_requested = True
            return
        self.lrs.append(float(self.planned[trainer.progress.step - 1]))
        self.raw.append(loss)
        self.smoothed.append(smooth)
        if smooth > self.cfg.diverge_factor * min(self.smoothed):
            self.diverged = trainer.stop_requested = True
        if len(self.lrs) == self.cfg.steps:
            trainer.stop_requested = True


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The learning rate at the steepest descent of `losses` against log10(lr), before their lowest point.

    The first tenth of the points (a smoothed loss that rests on a few batches) is skipped."""
    lr, loss = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if len(lr) < 3 or len(lr) != len(loss):
        raise ValueError(f"need at least 3 (lr, loss) points of equal length, got {len(lr)} and {len(loss)}")
    slope = np.gradient(loss, np.log10(lr))
    start, stop = len(lr) // 10, int(np.argmin(loss)) + 1
    if stop - start < 2:  # the loss never fell after the start: look everywhere
        start, stop = 0, len(lr)
    return float(lr[start + int(np.argmin(slope[start:stop]))])


def plot(lrs: list[float], raw: list[float], smoothed: list[float], suggested: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, raw, color="tab:blue", alpha=0.3, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested lr {suggested:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    low, high = min(*raw, *smoothed), max(min(max(smoothed), 2 * smoothed[0]), min(smoothed))  # divergence: cut
    pad = 0.05 * (high - low) or 0.05 * max(abs(high), 1e-3)
    ax.set_ylim(low - pad, high + pad)
    ax.legend()
    with path.open("xb") as file:  # never overwrite
        fig.savefig(file, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def find_lr(argv: Sequence[str]) -> dict[str, Any]:
    """Run the range test for these command-line arguments; returns what lr_find.json holds, plus its `dir`."""
    cfg, overrides = parse_args(argv)
    typed, config, choices = compose_train_config(overrides)
    out = Path(cfg.dir) if cfg.dir is not None else Path("lr_find", datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{PREFIX}dir={str(out)!r} is not allowed: expected a new or empty directory")
    test = RangeTest(cfg)
    trainer = Trainer(typed, out, config, choices, hooks=[test])
    for group in trainer.optimizer.param_groups:  # a backbone's group keeps its ratio to the head's
        group["lr"] = group["initial_lr"] = cfg.min_lr * group["initial_lr"] / typed.optim.lr
    ratio = cfg.max_lr / cfg.min_lr
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda step: ratio ** (min(step, cfg.steps - 1) / (cfg.steps - 1))
    )
    epoch = 0
    while not test.diverged and len(test.lrs) < cfg.steps:  # the test stops the trainer at either
        try:  # each epoch in its own seeded order, cycling through the run's epochs (and their settings)
            trainer.train_steps(trainer.feed.order.batches_per_epoch, epoch % trainer.epochs)
        except NonFiniteError:  # trainer.max_nonfinite reached at a log line: diverged too
            test.diverged = True
        epoch += 1
    suggested = suggest_lr(test.lrs, test.smoothed) if len(test.lrs) >= 3 else None
    if suggested is None:
        log.warning("the loss diverged within %d steps: lower lr_find.min_lr", len(test.lrs))
    result = {
        "lrs": test.lrs,
        "losses": test.smoothed,
        "raw_losses": test.raw,
        "suggested_lr": suggested,
        "diverged": test.diverged,
        "lr_find": dataclasses.asdict(cfg) | {"dir": str(out)},
        "overrides": overrides,
        "choices": choices,
        "config": config,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "lr_find.json"]
    with written[0].open("x") as file:  # never overwrite
        json.dump(result, file, indent=2)
    if test.lrs:
        written.append(out / "lr_find.png")
        plot(test.lrs, test.raw, test.smoothed, suggested, written[1])
    shown = f"{suggested:.3g}" if suggested is not None else "none"
    log.info("suggested optim.lr=%s (%d steps); wrote %s", shown, len(test.lrs), " and ".join(map(str, written)))
    return result | {"dir": out}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: a bad value or output directory exits 2 with one line, as train.py's checks do."""
    run_tool(find_lr, __doc__, argv)


if __name__ == "__main__":
    main()
