"""Fine-tuning: `model.freeze=backbone` trains the head and nothing else, `optim.backbone_lr_scale` gives the
backbone its own learning rate. A randomly initialised ResNet-18 stands in for pretrained weights (no network
here), trained for real through the engine on digits at 16 px."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from tests.conftest import TINY
from vitexp import checkpoint, run
from vitexp.config import ConfigError, validate
from vitexp.models import (
    CNNConfig,
    ResNetConfig,
    ViTConfig,
    build_model,
    count_parameters,
    freeze_backbone,
    is_head,
)
from vitexp.run import RunIdentity

RESNET = ["model=resnet18", *(o for o in TINY if not o.startswith("model.")), "data=digits", "data.batch_size=128"]
RESNET_HEAD = {"fc.weight", "fc.bias"}


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The weights a run of `cfg` starts from (the engine seeds with `seed` just before it builds the model)."""
    typed = validate(cfg)
    torch.manual_seed(typed.seed)
    return {
        name: value.clone() for name, value in build_model(typed.model, 10, typed.data.img_size).state_dict().items()
    }


def train(cfg: DictConfig, run_dir: Path) -> dict:
    run.run(cfg, run_dir, RunIdentity({}))
    return checkpoint.load(run_dir / "last.pt")


@pytest.mark.parametrize("optim", ["adamw", "adam", "sgd"])
def test_a_frozen_backbone_ends_bit_identical_and_the_head_learns(make_cfg, tmp_path: Path, optim: str) -> None:
    """Parameters and BatchNorm statistics alike: a frozen backbone runs in eval mode, so nothing of it moves
    (Adam's coupled weight decay included: no optimizer holds it)."""
    cfg = make_cfg(*RESNET, f"optim={optim}", "model.freeze=backbone", "trainer.epochs=1", "sched.warmup_epochs=0")
    before = initial_weights(cfg)
    state = train(cfg, tmp_path / "run")
    after = state["model"]
    assert after.keys() == before.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == RESNET_HEAD
    assert state["progress"]["step"] >= 5  # real steps were taken
    held = [p for group in state["optimizer"]["param_groups"] for p in group["params"]]
    assert len(held) == 2  # fc.weight and fc.bias only


def test_without_freezing_every_parameter_trains(make_cfg, tmp_path: Path) -> None:
    """The control: the same run unfrozen moves the backbone too (so the test above can tell)."""
    cfg = make_cfg(*RESNET, "trainer.epochs=1", "sched.warmup_epochs=0")
    before = initial_weights(cfg)
    after = train(cfg, tmp_path / "run")["model"]
    params = {name for name, _ in build_model(ResNetConfig(), 10, 16).named_parameters()}
    assert all(not torch.equal(before[name], after[name]) for name in params)


def test_backbone_lr_scale_trains_the_backbone_at_a_fraction_of_the_lr(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*RESNET, "optim=sgd", "optim.lr=0.05", "optim.backbone_lr_scale=0.1", "trainer.epochs=2")
    before = initial_weights(cfg)
    state = train(cfg, tmp_path / "run")
    groups = state["optimizer"]["param_groups"]
    assert [group["initial_lr"] for group in groups] == [0.05, 0.05, pytest.approx(0.005), pytest.approx(0.005)]
    assert all(group["lr"] == pytest.approx(group["initial_lr"] * groups[0]["lr"] / 0.05) for group in groups)
    assert [len(group["params"]) for group in groups[:2]] == [1, 1]  # fc.weight; fc.bias
    assert not torch.equal(before["conv1.weight"], state["model"]["conv1.weight"])  # the backbone trains


@pytest.mark.parametrize(
    "model_cfg,head,trainable",
    [
        (ResNetConfig(freeze="backbone"), RESNET_HEAD, 512 * 10 + 10),
        (ViTConfig(dim=32, depth=2, heads=2, patch_size=8, freeze="backbone"), {"head.weight", "head.bias"}, 330),
        (
            ViTConfig(dim=32, depth=2, heads=2, patch_size=8, code_size=16, freeze="backbone"),
            {"code.weight", "code.bias", "head.weight", "head.bias"},
            32 * 16 + 16 + 16 * 10 + 10,
        ),
        (
            CNNConfig(freeze="backbone"),
            {"code.weight", "code.bias", "head.weight", "head.bias"},
            10 * 10 * 32 * 128 + 128 + 128 * 10 + 10,
        ),
        (
            ResNetConfig(code_size=32, freeze="backbone"),
            {f"fc.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")},
            16_746,
        ),
    ],
    ids=["resnet18", "vit", "vit-code", "cnn", "resnet18-code"],
)
def test_only_the_head_is_trainable(model_cfg, head: set[str], trainable: int) -> None:
    model = build_model(model_cfg, num_classes=10, img_size=16)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == head
    assert {name for name, _ in model.named_parameters() if is_head(model, name)} == head
    assert count_parameters(model, trainable=True) == trainable
    unfrozen = build_model(type(model_cfg)(**{**vars(model_cfg), "freeze": "none"}), num_classes=10, img_size=16)
    assert count_parameters(model) == count_parameters(unfrozen) == count_parameters(unfrozen, trainable=True)
    model(torch.randn(2, 3, 16, 16)).square().sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == head


def test_a_frozen_backbone_stays_in_eval_mode_in_training() -> None:
    """BatchNorm keeps its statistics, and dropout and stochastic depth stay off in the frozen part."""
    resnet = build_model(ResNetConfig(freeze="backbone"), num_classes=10, img_size=16).train()
    assert resnet.training and resnet.fc.training and not resnet.bn1.training and not resnet.layer1[0].bn1.training
    stats = resnet.bn1.running_mean.clone()
    resnet(torch.randn(8, 3, 16, 16))
    assert torch.equal(resnet.bn1.running_mean, stats)
    assert not any(module.training for module in resnet.eval().modules())

    vit = build_model(
        ViTConfig(dim=32, depth=2, heads=2, patch_size=8, dropout=0.5, drop_path=0.5, freeze="backbone"), 10, 16
    )
    vit.train()
    assert vit.head.training and not any(block.training for block in vit.blocks)
    images = torch.randn(4, 3, 16, 16)
    state = torch.get_rng_state()
    first = vit(images)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(vit(images), first)  # nothing drawn


def test_freezing_a_model_that_names_no_head_is_refused() -> None:
    with pytest.raises(ConfigError, match="Sequential does not say which of its modules are its classification head"):
        freeze_backbone(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
