"""Optimizers: the registered ones build from their schemas, and each does the maths it names."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vitexp.config import ConfigError, SchedConfig, validate
from vitexp.models import ResNetConfig, ViTConfig, build_model, param_groups
from vitexp.optim import OPTIMIZERS, AdamConfig, AdamWConfig, SGDConfig, build_schedule


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


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ViTConfig(dim=32, depth=2, heads=2, patch_size=8, code_size=16), num_classes=10, img_size=16)


def names_of(model: nn.Module, params: list[torch.Tensor]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("cfg", [AdamWConfig(), SGDConfig(), AdamConfig()], ids=lambda cfg: cfg.name)
def test_backbone_lr_scale_1_keeps_the_groups_of_before(cfg) -> None:
    """At the default the optimizer holds exactly the groups it held before the key existed (goldens)."""
    model = small_vit()
    groups = OPTIMIZERS.build(cfg, model).param_groups
    if cfg.name == "adam":  # one group of every parameter, in model order
        expected = [list(model.parameters())]
    else:
        expected = [group["params"] for group in param_groups(model, cfg.weight_decay)]
    assert [group["params"] for group in groups] == expected
    assert all(group["lr"] == cfg.lr for group in groups)


@pytest.mark.parametrize(
    "cfg", [AdamWConfig(lr=2e-3), SGDConfig(lr=0.2), AdamConfig(lr=2e-3)], ids=lambda cfg: cfg.name
)
@pytest.mark.parametrize("model_cfg", [ViTConfig(dim=32, depth=2, heads=2, patch_size=8, code_size=16), ResNetConfig()])
def test_backbone_lr_scale_gives_the_backbone_groups_a_scaled_lr(cfg, model_cfg) -> None:
    cfg = dataclasses.replace(cfg, backbone_lr_scale=0.1)
    torch.manual_seed(0)
    model = build_model(model_cfg, num_classes=10, img_size=16)
    head = (
        {"head.weight", "head.bias", "code.weight", "code.bias"}
        if model_cfg.name == "vit"
        else {"fc.weight", "fc.bias"}
    )
    optimizer = OPTIMIZERS.build(cfg, model)
    at_lr, at_backbone_lr = set(), set()
    for group in optimizer.param_groups:
        assert group["lr"] in (cfg.lr, cfg.lr * 0.1)
        (at_lr if group["lr"] == cfg.lr else at_backbone_lr).update(names_of(model, group["params"]))
    assert at_lr == head and at_backbone_lr == {name for name, _ in model.named_parameters()} - head
    assert names_of(model, optimizer.param_groups[0]["params"]) <= head  # the logged lr (group 0) is the head's
    if cfg.name != "adam":  # weight decay still spares norms, biases and tokens, in the head and the backbone
        decays = [group["weight_decay"] for group in optimizer.param_groups]
        assert decays == [cfg.weight_decay, 0.0, cfg.weight_decay, 0.0]
        assert all(p.ndim > 1 for group in optimizer.param_groups[::2] for p in group["params"])


def test_the_schedule_scales_each_group_from_its_own_lr() -> None:
    """LambdaLR multiplies each group's initial lr by the factor: the backbone stays at scale x the head's."""
    model = small_vit()
    optimizer = OPTIMIZERS.build(AdamWConfig(lr=1e-3, backbone_lr_scale=0.25), model)
    scheduler = build_schedule(SchedConfig(warmup_epochs=1, min_lr=1e-5), optimizer, 1e-3, [4, 4, 4])
    seen = []
    for _ in range(12):
        head, _, backbone, _ = (group["lr"] for group in optimizer.param_groups)
        assert backbone == pytest.approx(0.25 * head, rel=1e-12)
        seen.append(head)
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-3 / 4) and max(seen) == pytest.approx(1e-3)  # warmup, then the peak
    assert seen[-1] < seen[5]  # and the cosine
    assert [group["initial_lr"] for group in optimizer.param_groups] == [1e-3, 1e-3, 2.5e-4, 2.5e-4]


@pytest.mark.parametrize("cfg", [AdamWConfig(), SGDConfig(), AdamConfig()], ids=lambda cfg: cfg.name)
def test_a_frozen_backbone_is_in_no_group(cfg) -> None:
    torch.manual_seed(0)
    model = build_model(ResNetConfig(freeze="backbone"), num_classes=10, img_size=16)
    optimizer = OPTIMIZERS.build(cfg, model)
    held = set().union(*(names_of(model, group["params"]) for group in optimizer.param_groups))
    assert held == {"fc.weight", "fc.bias"}
    assert {id(p) for p in optimizer.state} <= {id(p) for p in model.fc.parameters()}  # SGD's momentum buffers


def test_a_model_that_names_no_head_cannot_scale_its_backbone() -> None:
    with pytest.raises(ConfigError, match="does not say which of its modules are its classification head"):
        OPTIMIZERS.build(AdamWConfig(backbone_lr_scale=0.1), small_model())


@pytest.mark.parametrize("optim", ["adamw", "adam", "sgd"])
def test_a_backbone_lr_with_a_frozen_backbone_is_refused(make_cfg, optim: str) -> None:
    message = "optim.backbone_lr_scale=0.1 is not allowed: expected 1.0 with model.freeze=backbone"
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(f"optim={optim}", "model=resnet18", "model.freeze=backbone", "optim.backbone_lr_scale=0.1"))
    assert validate(make_cfg(f"optim={optim}", "optim.backbone_lr_scale=0.1")).optim.backbone_lr_scale == 0.1
    with pytest.raises(ConfigError, match=r"optim.backbone_lr_scale=0.0 is not allowed: expected a float > 0"):
        validate(make_cfg(f"optim={optim}", "optim.backbone_lr_scale=0"))
