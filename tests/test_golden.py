"""Refactors change no numbers: fixed runs must train exactly the weights the code trained when these
fingerprints were recorded (CPU, fp32; torch 2.14.1). A change that alters a run's arithmetic on purpose
records new fingerprints and says why in its commit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from vitexp import checkpoint, run
from vitexp.run import RunIdentity

# Two torch threads, as when the fingerprints were recorded: a reduction split another way rounds differently.
BASE = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "smoothing=0.1", "trainer.threads=2"]
RUNS = {
    "vit-cutout": ["aug=cutout", "model.dropout=0.1"],
    "vit-mixup": ["aug=mixup", "model.dropout=0.1"],
    "vit-cutmix": ["aug=cutmix", "aug.p=1.0", "model.dropout=0.1", "optim=sgd", "optim.lr=0.05"],
    "resnet18": ["model=resnet18", "aug=none", "trainer.epochs=1", "sched=none"],
}
FINGERPRINTS = {
    "vit-cutout": "e0d48d698e2582ed2732",
    "vit-mixup": "3045ca0cd0baa7e84545",
    "vit-cutmix": "fd9ddba7c381f882dbfa",
    "resnet18": "950051bfd508503b62b4",
}


def fingerprint(weights: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_trains_the_recorded_weights(make_cfg, tmp_path: Path, name: str) -> None:
    overrides = [o for o in RUNS[name] if not o.startswith("model=")]
    model = [o for o in RUNS[name] if o.startswith("model=")]
    base = [o for o in BASE if not (model and o.startswith("model."))]
    threads = torch.get_num_threads()
    try:
        run.run(make_cfg(*model, *base, *overrides), tmp_path / "run", RunIdentity({}))
    finally:  # the run set two threads: give this test process back its own (one under pytest-xdist)
        torch.set_num_threads(threads)
    assert fingerprint(checkpoint.load(tmp_path / "run" / "last.pt")["model"]) == FINGERPRINTS[name]
