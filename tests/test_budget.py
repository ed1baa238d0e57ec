"""How much training a run does and of what: accumulation that changes by epoch (with the schedule's step count
still right, and exact resume across a change), a budget in samples, and the loss trained (`loss=ce|l2`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tests.conftest import TINY
from vitexp import checkpoint, config, run
from vitexp.config import ConfigError, validate
from vitexp.engine import LOSS_FUNCTIONS, Trainer
from vitexp.logger import read_jsonl
from vitexp.metrics import EvalMeter
from vitexp.run import RunIdentity

BASE = [*TINY, "data=digits", "data.batch_size=64"]  # 1295 training images: 20 micro-batches an epoch
BY_EPOCH = "trainer.accumulate={0:4,1:2,2:1}"


def trainer_of(make_cfg, directory: Path, *overrides: str) -> Trainer:
    cfg = make_cfg(*BASE, *overrides)
    return Trainer(validate(cfg), directory, OmegaConf.to_container(cfg, resolve=True), {})


def test_accumulation_by_epoch_steps_the_schedule_the_right_number_of_times(make_cfg, tmp_path: Path) -> None:
    trainer = trainer_of(make_cfg, tmp_path, BY_EPOCH, "trainer.epochs=4", "sched.warmup_epochs=1.5")
    assert trainer.micro_batches == 20 and trainer.epoch_steps == [5, 10, 20, 20]
    factor = trainer.scheduler.lr_lambdas[0]
    warmup = 5 + 5  # epoch 0's 5 steps, then half of epoch 1's 10
    assert [factor(step) for step in (0, warmup - 1)] == [pytest.approx(1 / warmup), 1.0]
    assert factor(55) == pytest.approx(validate(make_cfg()).sched.min_lr / 1e-3)  # after the last of 55 steps
    trainer.fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [5, 15, 35, 55]


def test_accumulation_by_epoch_resumes_exactly_across_a_change(make_cfg, tmp_path: Path, stop_once_at) -> None:
    overrides = [*BASE, BY_EPOCH, "trainer.epochs=3"]
    straight = run.run(make_cfg(*overrides), tmp_path / "straight", RunIdentity({}))
    stop_once_at(9)
    assert run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({})) == {}
    resumed = run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({}))
    assert resumed["test"] == straight["test"]
    weights = [checkpoint.load(tmp_path / name / "last.pt")["model"] for name in ("straight", "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.parametrize(
    "value", ["{1:2}", "{0:0}", "0", "{0:2,-1:1}"], ids=["no-epoch-0", "zero-factor", "zero", "negative"]
)
def test_a_bad_accumulation_is_refused_by_name(make_cfg, value: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer.accumulate=.* is not allowed: expected an integer >= 1, or"):
        validate(make_cfg(f"trainer.accumulate={value}"))


def test_a_budget_in_samples_sets_the_epochs(make_cfg, tmp_path: Path) -> None:
    trainer = trainer_of(make_cfg, tmp_path, "trainer.samples=2600", "trainer.epochs=1", "sched.warmup_epochs=0.5")
    assert trainer.epochs == 3  # 1280 images an epoch: two epochs fall short of 2600
    assert sum(trainer.epoch_steps) == 60 and trainer.scheduler.lr_lambdas[0](60) == pytest.approx(0.01)
    results = trainer.fit()
    assert results["epochs"] == 3 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 3


def test_the_l2_loss_is_the_mean_squared_distance_to_the_soft_target() -> None:
    assert tuple(LOSS_FUNCTIONS) == config.LOSSES
    logits, target = torch.randn(8, 5), torch.softmax(torch.randn(8, 5), dim=-1)
    assert torch.allclose(LOSS_FUNCTIONS["l2"](logits, target), ((logits - target) ** 2).sum() / 40)
    meter, labels = EvalMeter(5, torch.device("cpu"), l2=True), torch.randint(0, 5, (8,))
    meter.update(logits, labels)
    values = meter.compute()
    assert values["l2"] == pytest.approx(F.mse_loss(logits, F.one_hot(labels, 5).float()).item(), rel=1e-6)
    assert values["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_an_l2_run_reports_the_loss_it_trained_beside_the_nll(make_cfg, tmp_path: Path) -> None:
    results = trainer_of(make_cfg, tmp_path, "loss=l2", "trainer.epochs=1").fit()
    [row] = read_jsonl(tmp_path / "metrics.jsonl")
    assert 0 < row["val/l2"] < 1 < row["val/loss"] and 0 < row["train/loss"] < 1  # train: the l2 it trained
    assert (
        "l2" in results["test"] and "l2" not in trainer_of(make_cfg, tmp_path / "ce", "trainer.epochs=1").fit()["test"]
    )
    with pytest.raises(ConfigError, match="loss='hinge' is not allowed: expected one of ce, l2"):
        validate(make_cfg("loss=hinge"))
