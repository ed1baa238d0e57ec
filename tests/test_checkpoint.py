"""Checkpoints survive a crash while being written: the previous one stays loadable."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitexp import checkpoint


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1, "weights": torch.ones(1000)})
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(path, {"epoch": 2, "weights": torch.zeros(10_000_000), "bad": ExplodesWhenPickled()})
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


WRITER = """
import sys, torch
from pathlib import Path
from vitexp import checkpoint
path = Path(sys.argv[1])
checkpoint.save(path, {"version": 0, "weights": torch.zeros(4)})
print("ready", flush=True)
version = 1
while True:  # rewrite a large checkpoint until killed
    checkpoint.save(path, {"version": version, "weights": torch.full((50_000_000,), float(version))})
    version += 1
"""


def test_sigkill_while_writing_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)  # wait until a write is in flight
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    state = checkpoint.load(path)
    version = state["version"]
    assert torch.all(state["weights"] == float(version))  # a complete checkpoint of one version
    checkpoint.save(path, {"version": "next"})  # the next write clears what the killed writer left
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_rng_state_round_trip_reproduces_draws() -> None:
    checkpoint.seed_everything(3)
    state = checkpoint.rng_state()
    first = (torch.rand(3), np.random.rand(), random.random())
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


class RunsCode:
    """A pickle payload that would create a file if it were ever unpickled with the unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker, path = tmp_path / "code-ran", tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(2)}, "progress": RunsCode(marker)}, path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {path} holds objects other than tensors"):
        checkpoint.load(path)
    assert not marker.exists()


def test_checkpoint_state_round_trips_through_the_safe_loader(tmp_path: Path) -> None:
    checkpoint.seed_everything(5)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state too
    checkpoint.save(tmp_path / "state.pt", {"rng": checkpoint.rng_state()})
    first = (torch.rand(3), np.random.rand(), np.random.standard_normal(), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "state.pt")["rng"])
    again = (torch.rand(3), np.random.rand(), np.random.standard_normal(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_a_checkpoint_from_before_the_safe_format_still_resumes(tmp_path: Path) -> None:
    """Earlier versions stored NumPy's RNG state as its legacy tuple with an array: plain data, allowed."""
    checkpoint.seed_everything(7)
    legacy = checkpoint.rng_state() | {"numpy": np.random.get_state()}
    torch.save({"rng": legacy}, tmp_path / "old.pt")
    first = np.random.rand(4)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.rand(4), first)
