"""The embedding probe (seed 001's "accuracy (svc)"): its number equals an SVC fitted by hand on the same
embeddings, it is well above chance on digits, and probing leaves the trained weights unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn.svm import SVC

from tests.conftest import TINY
from vitexp import checkpoint, run
from vitexp.config import ConfigError, validate
from vitexp.engine import Trainer
from vitexp.logger import read_jsonl
from vitexp.run import RunIdentity

BASE = [*TINY, "data=digits", "data.batch_size=128", "trainer.epochs=2", "model.code_size=16"]


def test_the_svc_probe_equals_one_fitted_by_hand_and_beats_chance(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*BASE, "probe=svc", "probe.max_train=300")
    results = run.run(cfg, tmp_path / "run", RunIdentity({}))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(0.3 < row["val/acc_svc"] <= 1 for row in rows)  # ten classes: chance is 0.1
    trainer = Trainer(validate(cfg), tmp_path / "scratch", OmegaConf.to_container(cfg, resolve=True), {})
    trainer.model.load_state_dict(checkpoint.load(tmp_path / "run" / "best.pt")["model"])
    trainer.model.eval()
    chosen = np.sort(np.random.default_rng(0).permutation(len(trainer.splits.train))[:300])

    def embedded(dataset, indices) -> tuple[np.ndarray, np.ndarray]:
        images, labels = dataset.tensors
        with torch.inference_mode():
            codes = trainer.model.embed(trainer.prepare_eval(images[indices]))
        assert codes.shape[1] == 16  # the code layer's width
        return codes.numpy(), labels[indices].numpy()

    train = embedded(trainer.splits.train, torch.as_tensor(chosen))
    test = embedded(trainer.splits.test, torch.arange(len(trainer.splits.test)))
    by_hand = SVC().fit(*train).score(*test)
    assert results["test"]["acc_svc"] == pytest.approx(by_hand, abs=1e-9) and by_hand > 0.3


def test_probing_changes_no_weight_and_the_linear_probe_reports_its_own_key(make_cfg, tmp_path: Path) -> None:
    probed = run.run(make_cfg(*BASE, "probe=linear", "probe.every=2"), tmp_path / "probed", RunIdentity({}))
    plain = run.run(make_cfg(*BASE), tmp_path / "plain", RunIdentity({}))
    weights = [checkpoint.load(tmp_path / name / "last.pt")["model"] for name in ("probed", "plain")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert [("val/acc_linear" in row) for row in read_jsonl(tmp_path / "probed" / "metrics.jsonl")] == [False, True]
    assert 0.3 < probed["test"]["acc_linear"] <= 1 and "acc_linear" not in plain["test"]
    with pytest.raises(ConfigError, match="probe.every=0 is not allowed: expected an integer >= 1"):
        validate(make_cfg("probe=svc", "probe.every=0"))


def test_training_images_as_evaluation_sees_them_are_the_same_from_the_device_or_a_dataloader(
    make_cfg, tmp_path: Path
) -> None:
    """What probes and SWA's BatchNorm update read: the chosen training images, whichever way batches come."""
    served = []
    for mode in ("true", "false"):
        cfg = make_cfg(*BASE, f"data.on_device={mode}", "data.eval_batch_size=50")
        trainer = Trainer(validate(cfg), tmp_path / mode, {}, {})
        indices = torch.tensor([3, 7, 700, 1200])
        served.append([torch.cat(parts) for parts in zip(*trainer.feed.eval("train", indices), strict=True)])
        assert trainer.feed.resident == (mode == "true")
        every = sum(len(labels) for _, labels in trainer.feed.eval("train"))
        assert every == len(trainer.splits.train)
    assert torch.equal(served[0][0], served[1][0]) and torch.equal(served[0][1], served[1][1])
    assert served[0][0].shape[0] == 4
