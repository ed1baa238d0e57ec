"""Weight averages: the EMA's maths step by step, a skipped step leaving it alone, its figures, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY
from vitexp import checkpoint, engine, run
from vitexp.averaging import EMA
from vitexp.config import ConfigError, config_hash, validate
from vitexp.engine import Hook, Trainer
from vitexp.logger import read_jsonl
from vitexp.models import VisionTransformer
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


def test_an_ema_run_reports_and_resumes_exactly(make_cfg, tmp_path: Path, monkeypatch) -> None:
    overrides = [*BASE, "aug=cutmix", "trainer.ema_decay=0.8"]
    straight = run.run(make_cfg(*overrides), tmp_path / "straight", RunIdentity({}))
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert all(0 <= row["val_ema/acc"] <= 1 for row in rows) and len(rows) == 2
    best = max(range(2), key=lambda i: rows[i]["val_ema/acc"])  # the first of equals, as the run keeps it
    assert straight["best_ema_epoch"] == best + 1
    assert set(straight["test_ema"]) == set(straight["test"])
    saved = checkpoint.load(tmp_path / "straight" / "best_ema.pt")
    assert saved["epoch"] == best + 1 and saved["val"]["acc"] == rows[best]["val_ema/acc"]

    original, stopped = engine.Trainer.optimizer_step, {"done": False}

    def stop_after_three_steps(self, finite):
        original(self, finite)
        if self.progress.step == 3 and not stopped["done"]:
            stopped["done"] = self.stop_requested = True

    monkeypatch.setattr(engine.Trainer, "optimizer_step", stop_after_three_steps)
    assert run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({})) == {}
    resumed = run.run(make_cfg(*overrides), tmp_path / "resumed", RunIdentity({}))
    assert resumed["test_ema"] == straight["test_ema"] and resumed["test"] == straight["test"]
    averages = [checkpoint.load(tmp_path / name / "last.pt")["hooks"][1]["weights"] for name in ("straight", "resumed")]
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
