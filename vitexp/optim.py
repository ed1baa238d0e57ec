"""Optimizers and learning-rate schedules: the `optim` and `sched` groups' options and their builders.

Every optimizer is fused (CPU and CUDA): one kernel per step that can also skip a non-finite step on
the device (`found_inf`), so the training loop never waits for the GPU. A schedule is a per-step factor
of `optim.lr` (LambdaLR), counted in optimizer steps, skipped ones included.

Fine-tuning: `optim.backbone_lr_scale` puts the backbone (all but the head the model names, see
`vitexp.models.HeadFinetuning`) in param groups of their own at `optim.lr * scale`. LambdaLR multiplies
each group's own initial rate by the schedule's factor, so the ratio holds at every step. At the default
1.0 the groups are exactly those of before the key existed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vitexp.config import Config, OptimConfig, Rule, SchedConfig
from vitexp.models import is_head, param_groups
from vitexp.registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optim")
SCHEDULES: Registry[Callable[[int], float]] = Registry("sched")


@dataclass
class AdamWConfig(OptimConfig):
    name: str = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's moment decay rates
    eps: float = 1e-8  # added to the second moment's root

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "[beta1, beta2] in [0, 1)"
        yield "eps", self.eps > 0, "a float > 0"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        yield from super().rules_in(config)
        yield from finetune_rules(self, config)


@dataclass
class AdamConfig(AdamWConfig):
    """Adam with coupled L2 weight decay (added to the gradient) on every parameter, as the KunViT recipe
    trains; AdamW decouples the decay and spares norms, biases and tokens."""

    name: str = "adam"
    weight_decay: float = 5e-5  # L2 on every parameter, norms and biases included (the KunViT recipe's value)


@dataclass
class SGDConfig(OptimConfig):
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9  # 0: plain SGD
    nesterov: bool = True  # Nesterov momentum (needs momentum > 0)

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "momentum", 0 <= self.momentum < 1, "a float in [0, 1)"
        yield (
            "nesterov",
            not (self.nesterov and self.momentum == 0),
            "false with optim.momentum=0 (Nesterov needs momentum)",
        )

    def rules_in(self, config: Config) -> Iterator[Rule]:
        yield from super().rules_in(config)
        yield from finetune_rules(self, config)


def finetune_rules(optim: OptimConfig, config: Config) -> Iterator[Rule]:
    """A backbone learning rate means nothing for a frozen backbone: refused rather than silently ignored."""
    frozen = config.model.freeze == "backbone"
    yield (
        "optim.backbone_lr_scale",
        not (frozen and optim.backbone_lr_scale != 1),
        "1.0 with model.freeze=backbone (a frozen backbone is not trained)",
    )


def backbone_lr(cfg: OptimConfig) -> float | None:
    """The backbone's learning rate; None at `backbone_lr_scale=1`: one rate, and the groups of before."""
    return None if cfg.backbone_lr_scale == 1 else cfg.lr * cfg.backbone_lr_scale


@OPTIMIZERS.register("adamw", AdamWConfig)
def build_adamw(cfg: AdamWConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, backbone_lr(cfg))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


@OPTIMIZERS.register("adam", AdamConfig)
def build_adam(cfg: AdamConfig, model: nn.Module) -> torch.optim.Optimizer:
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups: list = [param for _, param in trainable]  # one group, every parameter decayed (the recipe's)
    if (lr := backbone_lr(cfg)) is not None:
        head = {name for name, _ in trainable if is_head(model, name)}
        groups = [
            {"params": [param for name, param in trainable if name in head]},
            {"params": [param for name, param in trainable if name not in head], "lr": lr},
        ]
    return torch.optim.Adam(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True
    )


@OPTIMIZERS.register("sgd", SGDConfig)
def build_sgd(cfg: SGDConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, backbone_lr(cfg))
    sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    if cfg.momentum:  # fused SGD leaves a buffer it creates on a skipped first step uninitialised
        for param in model.parameters():
            if param.requires_grad:  # the optimizer's parameters: a frozen one is in no group
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return sgd


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("cosine", SchedConfig)
def cosine(cfg: SchedConfig, lr: float, epoch_steps: Sequence[int]) -> Callable[[int], float]:
    whole = min(int(cfg.warmup_epochs), len(epoch_steps))
    if len(set(epoch_steps)) == 1:  # the same steps every epoch
        warmup = round(cfg.warmup_epochs * epoch_steps[0])
    else:  # accumulation by epoch: the steps of the whole warmup epochs and a share of the next one's
        partial = epoch_steps[whole] * (cfg.warmup_epochs - whole) if whole < len(epoch_steps) else 0
        warmup = sum(epoch_steps[:whole]) + round(partial)
    return lambda step: lr_factor(step, warmup, sum(epoch_steps), cfg.min_lr / lr)


@SCHEDULES.register("none", SchedConfig)
def constant(cfg: SchedConfig, lr: float, epoch_steps: Sequence[int]) -> Callable[[int], float]:
    return lambda step: 1.0


def build_schedule(
    cfg: SchedConfig, optimizer: torch.optim.Optimizer, lr: float, epoch_steps: Sequence[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate factor of every optimizer step; `epoch_steps` are the optimizer steps of each epoch
    (they differ when `trainer.accumulate` changes by epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.build(cfg, lr, epoch_steps))
