"""Optimizers: the registered ones build from their schemas, and each does the maths it names."""

from __future__ import annotations

import torch
from torch import nn

from vitexp.optim import OPTIMIZERS, AdamConfig, AdamWConfig


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def one_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model(torch.randn(16, 4)).pow(2).mean().backward()
    optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_adam_adds_l2_decay_to_every_gradient() -> None:
    """optim=adam is torch's Adam with weight_decay (coupled: wd * w joins the gradient), biases and norms too."""
    cfg = AdamConfig(lr=1e-2, weight_decay=0.1)
    model, reference = small_model(), small_model()
    ours = one_step(OPTIMIZERS.build(cfg, model), model)
    expected = one_step(torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=0.1), reference)
    for name in expected:
        assert torch.allclose(ours[name], expected[name], atol=1e-6), name


def test_adam_decays_what_adamw_spares() -> None:
    """At zero gradient, Adam's coupled L2 still moves a LayerNorm weight; AdamW leaves norms undecayed."""
    for cfg, moves in ((AdamConfig(lr=1e-2, weight_decay=0.1), True), (AdamWConfig(lr=1e-2, weight_decay=0.1), False)):
        model = small_model()
        optimizer = OPTIMIZERS.build(cfg, model)
        norm = model[1].weight
        before = norm.detach().clone()
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
        assert (not torch.equal(norm, before)) == moves, cfg.name
        assert torch.allclose(norm.detach(), before - (1e-2 if moves else 0.0), atol=1e-5)  # Adam's first step: lr
