"""Weight averages: the EMA's maths step by step, a skipped step leaving it alone; SWA's mean and learning rate;
their figures and exact resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY
from vitexp import checkpoint, run
from vitexp.averaging import EMA, SWA, averaging_hooks
from vitexp.config import ConfigError, config_hash, validate
from vitexp.engine import Hook, Trainer
from vitexp.logger import read_jsonl
from vitexp.models import VisionTransformer, build_model
from vitexp.run import RunIdentity

BASE = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "sched.warmup_epochs=0.5"]


class Snapshots(Hook):
    """The trained weights when training starts and after every step, and whether each step was applied."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self.applied: list[bool] = []

    def start(self, trainer: Trainer) -> None:
        self.weights.append([p.detach().clone() for p in trainer.model.parameters()])

    def after_step(self, trainer: Trainer) -> None:
        self.weights.append([p.detach().clone() for p in trainer.model.parameters()])
        self.applied.append(bool(trainer.step_finite))


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_follows_its_recurrence_and_ignores_a_skipped_step(make_cfg, tmp_path, monkeypatch, warmup) -> None:
    forward, calls = VisionTransformer.forward, {"n": 0}

    def nan_on_the_third_step(self, images):
        calls["n"] += self.training
        logits = forward(self, images)
        return logits * float("nan") if self.training and calls["n"] == 3 else logits

    monkeypatch.setattr(VisionTransformer, "forward", nan_on_the_third_step)
    cfg = make_cfg(*BASE, "trainer.epochs=1")
    snapshots, ema = Snapshots(), EMA(0.9, warmup)
    config = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(validate(cfg), tmp_path, config, {}, hooks=[snapshots, ema])
    trainer.fit()
    assert snapshots.applied == [True, True, False] + [True] * 7  # 10 steps an epoch, the third one skipped
    expected = snapshots.weights[0]
    for step, (weights, applied) in enumerate(zip(snapshots.weights[1:], snapshots.applied, strict=True)):
        decay = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        if applied:
            expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    assert ema.model is not None
    for mine, theirs in zip(ema.model.parameters(), expected, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


def test_an_ema_run_reports_and_resumes_exactly(make_cfg, tmp_path: Path, stop_once_at) -> None:
    overrides = [*BASE, "aug=cutmix", "trainer.ema_decay=0.8"]
    straight = run.run(make_cfg(*overrides), tmp_path / "straight", RunIdentity({}))
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(0 <= row["val_ema/acc"] <= 1 for row in rows) and len(rows) == 2
    best = max(range(2), key=lambda i: rows[i]["val_ema/acc"])  # the first of equals, as the run keeps it
    assert straight["best_ema_epoch"] == best + 1
    assert set(straight["test_ema"]) == set(straight["test"])
    saved = checkpoint.load(tmp_path / "straight" / "best_ema.pt")
    assert saved["epoch"] == best + 1 and saved["val"]["acc"] == rows[best]["val_ema/acc"]

    stop_once_at(3)
    assert run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({})) == {}
    resumed = run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({}))
    assert resumed["test_ema"] == straight["test_ema"] and resumed["test"] == straight["test"]
    averages = [
        checkpoint.load(tmp_path / name / "last.pt")["hooks"]["EMA"]["weights"] for name in ("straight", "resumed")
    ]
    for key in averages[0]:
        assert torch.equal(averages[0][key], averages[1][key]), key


def test_no_ema_unless_asked_and_the_decay_is_checked(make_cfg, tmp_path: Path) -> None:
    results = run.run(make_cfg(*BASE, "trainer.epochs=1"), tmp_path / "run", RunIdentity({}))
    assert "test_ema" not in results and "val_ema/acc" not in read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert not (tmp_path / "run" / "best_ema.pt").exists()
    with pytest.raises(ConfigError, match=r"trainer.ema_decay=1.0 is not allowed: expected a float in \[0, 1\)"):
        validate(make_cfg("trainer.ema_decay=1.0"))
    config = OmegaConf.to_container(make_cfg(*BASE), resolve=True)
    assert isinstance(config, dict)
    before = json.loads(json.dumps(config))
    del before["trainer"]["ema_decay"], before["trainer"]["ema_warmup"]
    assert config_hash(before) == config_hash(config)  # runs made before the EMA existed still resume


class EpochSnapshots(Hook):
    """The trained weights at the end of every epoch, and the learning rate of every step."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.lrs: list[float] = []

    def after_step(self, trainer: Trainer) -> None:
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the next step's, set by the schedule

    def after_epoch(self, trainer: Trainer, row: dict) -> None:
        self.weights[row["epoch"]] = [p.detach().clone() for p in trainer.model.parameters()]


def test_swa_averages_the_epochs_from_its_start_and_anneals_the_learning_rate(make_cfg, tmp_path: Path) -> None:
    overrides = [*BASE, "trainer.epochs=4", "trainer.swa_start=2", "trainer.swa_lr=2e-4", "trainer.swa_anneal_epochs=2"]
    cfg = make_cfg(*overrides, "optim.lr=1e-3", "sched=none")
    snapshots, typed = EpochSnapshots(), validate(cfg)
    [swa] = averaging_hooks(typed)
    config = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(typed, tmp_path, config, {}, hooks=[snapshots, swa])
    results = trainer.fit()
    assert isinstance(swa, SWA) and swa.averaged is not None and swa.snapshots == 3 == results["swa_epochs"]
    for averaged, *taken in zip(
        swa.averaged.module.parameters(), *(snapshots.weights[e] for e in (2, 3, 4)), strict=True
    ):
        torch.testing.assert_close(averaged, torch.stack(taken).mean(0), atol=1e-7, rtol=1e-6)
    saved = checkpoint.load(tmp_path / "swa.pt")["model"]
    assert all(torch.equal(saved[k], v) for k, v in swa.averaged.module.state_dict().items())
    # 10 steps an epoch: 1e-3 for the first; then a cosine over 20 steps down to 2e-4, which it keeps
    assert snapshots.lrs[:9] == pytest.approx([1e-3] * 9)
    anneal = [2e-4 + (1e-3 - 2e-4) * (1 + math.cos(math.pi * k / 20)) / 2 for k in range(1, 21)]
    assert snapshots.lrs[9:29] == pytest.approx(anneal) and snapshots.lrs[29:] == pytest.approx([2e-4] * 11)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert ["val_swa/acc" in row for row in rows] == [False, True, True, True]
    assert [row.get("swa_epochs") for row in rows] == [None, 1, 2, 3]
    assert set(results["test_swa"]) == set(results["test"])


def test_swa_recomputes_batchnorm_statistics_and_resumes_exactly(make_cfg, tmp_path: Path, stop_once_at) -> None:
    overrides = [
        *[key for key in BASE if not key.startswith("model.")],
        "model=resnet18",
        "trainer.epochs=3",
        "trainer.swa_start=2",
        "trainer.swa_lr=5e-4",
        "data.batch_size=256",
        "data.limit_batches=2",  # 2 steps an epoch: ResNet-18 is the slow part
    ]
    straight = run.run(make_cfg(*overrides), tmp_path / "straight", RunIdentity({}))
    averaged = checkpoint.load(tmp_path / "straight" / "swa.pt")["model"]
    last = checkpoint.load(tmp_path / "straight" / "last.pt")
    model = build_model(validate(make_cfg(*overrides)).model, 10, 16)
    model.load_state_dict(averaged)  # BN statistics of the average over the training images, as evaluation sees them
    trainer = Trainer(validate(make_cfg(*overrides)), tmp_path / "scratch", {}, {})
    fresh = copy.deepcopy(model)
    images = (trainer.prepare_eval(batch) for batch, _ in trainer.feed.eval("train"))
    torch.optim.swa_utils.update_bn(images, fresh)
    assert torch.allclose(averaged["bn1.running_mean"], fresh.state_dict()["bn1.running_mean"], atol=1e-6)
    assert not torch.allclose(averaged["bn1.running_mean"], last["model"]["bn1.running_mean"])

    stop_once_at(5)  # in epoch 3, after epoch 2's weights entered the average
    assert run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({})) == {}
    resumed = run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({}))
    assert resumed["test_swa"] == straight["test_swa"] and resumed["swa_epochs"] == 2
    again = checkpoint.load(tmp_path / "resumed" / "swa.pt")["model"]
    assert all(torch.equal(again[key], value) for key, value in averaged.items())
