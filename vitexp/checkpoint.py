"""Atomic checkpoints and the random-number state that makes a resumed run continue bit for bit."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; resuming from scratch would silently lose work."""


def atomic_write(path: Path, write: Any) -> None:
    """Write via `write(file)` to a temp file in the same directory, fsync it, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a torn mix. Temp files that
    a killed writer left behind are removed first (one writer per run directory).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda file: torch.save(state, file))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; raise CheckpointError naming the file if it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); refusing to start over. "
            "Move it away to train from scratch."
        ) from err


def rng_state() -> dict[str, Any]:
    """Global RNG states (dropout and anything else drawing from them)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
