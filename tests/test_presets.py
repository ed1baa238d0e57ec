"""The seeds' recipes as presets: each composes, validates, and has the seed's parameter count and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_train
from vitexp.config import validate
from vitexp.models import build_model, count_parameters

# Seed 001's table: row -> parameters (patch 7, 28 px, 10 classes)
FMNIST_ROWS = {
    "grey": 2_185_610,
    "purple": 2_185_610,
    "not_shown": 2_185_610,
    "orange": 4_294_026,
    "yellow": 4_294_026,
    "magenta": 4_469_178,
    "red": 6_395_274,
    "blue": 2_185_610,
    "green": 8_510_858,
    "dark_blue": 25_453_962,
}


def test_pets_lab_is_seed_000s_lab(make_cfg) -> None:
    cfg = validate(make_cfg("+experiment=pets_lab"))
    assert count_parameters(build_model(cfg.model, 37, cfg.data.img_size)) == 85_827_109  # ViT-B/16, 37 classes
    assert (cfg.model.dim, cfg.model.depth, cfg.model.heads, cfg.model.mlp_ratio, cfg.model.dropout) == (
        768,
        12,
        12,
        4.0,
        0.1,
    )
    assert (cfg.data.name, cfg.data.img_size, cfg.data.crop, cfg.data.batch_size) == ("pets", 224, "squash", 32)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.name) == ("adamw", 1e-3, 0.01, "none")
    assert (cfg.trainer.epochs, cfg.trainer.clip_grad_norm, cfg.aug.name) == (10, 0, "none")
    mixup = validate(make_cfg("+experiment=pets_lab", "aug=mixup", "aug.alpha=1.0")).aug
    assert (mixup.name, mixup.alpha) == ("mixup", 1.0)  # the seed's Beta(1, 1), as the preset's header says


def test_vit_cifar10_is_seed_003s_upstream_recipe(make_cfg) -> None:
    cfg = validate(make_cfg("+experiment=vit_cifar10"))
    assert (cfg.optim.name, cfg.optim.weight_decay, cfg.optim.lr, cfg.sched.warmup_epochs, cfg.sched.min_lr) == (
        "adam",
        5e-5,
        1e-3,
        5.0,
        1e-5,
    )
    assert (cfg.data.crop, cfg.data.crop_padding, cfg.data.hflip, cfg.data.policy) == (
        "pad_crop",
        4,
        0.5,
        "autoaugment",
    )
    assert (cfg.smoothing, cfg.data.batch_size, cfg.trainer.epochs, cfg.data.val_fraction) == (0.1, 128, 200, 0.1)
    assert validate(make_cfg("+experiment=vit_cifar10", "data.val_fraction=0")).data.val_fraction == 0


def test_fmnist_vit_is_seed_001s_grey_row(make_cfg) -> None:
    cfg = validate(make_cfg("+experiment=fmnist_vit"))
    assert count_parameters(build_model(cfg.model, 10, cfg.data.img_size)) == 2_185_610
    assert (cfg.loss, cfg.trainer.samples, cfg.data.policy, cfg.data.crop) == (
        "l2",
        2_000_000,
        "trivialaugment",
        "squash",
    )
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_size, cfg.sched.name, cfg.sched.warmup_epochs) == (
        "adamw",
        3e-4,
        64,
        "cosine",
        0,
    )


@pytest.mark.parametrize("row", list(FMNIST_ROWS))
def test_each_row_of_seed_001s_table_has_its_parameter_count(make_cfg, row: str) -> None:
    cfg = validate(make_cfg("+experiment=fmnist_vit", f"+fmnist_row={row}"))
    assert count_parameters(build_model(cfg.model, 10, cfg.data.img_size)) == FMNIST_ROWS[row]
    assert cfg.trainer.samples == (780_000 if row == "green" else 2_000_000)


def test_the_seed_001_table_is_one_command(tmp_path: Path) -> None:
    command = ["+experiment=fmnist_vit", "+sweep=fmnist_matrix", "dry_run=true", f"hydra.sweep.dir={tmp_path / 's'}"]
    result = run_train("-m", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 jobs" in result.stdout and "+fmnist_row=dark_blue" in result.stdout


def test_seed_001s_resnet_row_has_its_parameter_count(make_cfg) -> None:
    cfg = validate(make_cfg("model=resnet18", "model.code_size=128", "data=fmnist", "data.img_size=28", "loss=l2"))
    model = build_model(cfg.model, 10, cfg.data.img_size)
    assert count_parameters(model) == 11_243_466 and [m.out_features for m in model.fc] == [128, 10]
