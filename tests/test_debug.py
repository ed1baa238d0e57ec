"""The debug presets: `debug=fast` checks a config end to end on a few batches; `debug=overfit` memorises them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tests.conftest import TINY
from vitexp import run
from vitexp.config import validate
from vitexp.data import build_splits
from vitexp.logger import RunIdentity


def test_fast_runs_one_epoch_of_two_batches_per_split_without_a_logger(make_cfg, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vitexp")
    cfg = make_cfg(*TINY, "data=digits", "debug=fast")
    typed = validate(cfg)
    assert (typed.trainer.epochs, typed.data.limit_batches, typed.logger) == (1, 2, {})
    results = run.run(make_cfg(*TINY, "data=digits", "debug=fast"), tmp_path / "run", RunIdentity({}))
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["epoch"] == 1
    assert "128 train / 143 val / 359 test images" in caplog.text  # digits' val and test hold fewer than 2 x 256
    assert results["test"]["acc"] >= 0


def test_limit_batches_keeps_a_seeded_subset_and_tensor_datasets(make_cfg) -> None:
    full = build_splits(validate(make_cfg(*TINY, "data=digits")).data)
    cut = validate(make_cfg(*TINY, "data=digits", "data.limit_batches=1", "data.eval_batch_size=50")).data
    first, again = build_splits(cut), build_splits(cut)
    assert [len(first.train), len(first.val), len(first.test)] == [64, 50, 50]
    assert first.train.tensors[1].tolist() == again.train.tensors[1].tolist()  # the same images every time
    assert len(set(first.train.tensors[1].tolist())) >= 8  # a sample of the classes, not the first class's images
    full_images = {bytes(image.numpy()) for image in full.train.tensors[0]}
    assert all(bytes(image.numpy()) in full_images for image in first.train.tensors[0])  # taken from the split


def test_overfit_memorises_its_batches(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*TINY, "data=digits", "debug=overfit", "model.dim=64", "optim.lr=3e-3")
    run.run(cfg, tmp_path / "run", RunIdentity({}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(row["train/acc"] for row in rows[-5:]) >= 0.99
