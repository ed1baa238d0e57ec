"""Atomic checkpoints and the random-number state that makes a resumed run continue bit for bit.

Checkpoints hold tensors and plain Python data only, and are read with PyTorch's safe (`weights_only`)
unpickler: opening a checkpoint someone else wrote can never run code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.device import cuda_rng_state, set_cuda_rng_state

LAST_FILE = "last.pt"  # every piece of training state, written every epoch and at a stop
BEST_FILE = "best.pt"  # the weights of the best validation epoch, which the test runs on


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


# NumPy's array reconstruction: plain data, found in the RNG state of checkpoints written before
# states were stored as tensors. Allowed so those runs still resume; it cannot run code.
LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.ndarray((0,)).__reduce__()[0]]


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with the safe unpickler; raise CheckpointError naming the file if it
    is unreadable or holds anything but tensors and plain data (unpickling that could run code)."""
    try:
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"checkpoint {path} is unreadable ({err})") from err
        found = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({next(g for g in found.groups() if g)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data{what}; refusing to load it, "
            "since unpickling them could run code. vitexp never writes such checkpoints: use one you trust"
        ) from None
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity (one device sync for all of them)."""
    names = [name for name, t in tensors.items() if t.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def rng_state() -> dict[str, Any]:
    """Global RNG states (dropout and anything else drawing from them), as tensors and plain data."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda_rng_state(),
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    set_cuda_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # the key array was stored as a tensor; older checkpoints hold the legacy tuple
        numpy_state = numpy_state | {"state": numpy_state["state"] | {"key": numpy_state["state"]["key"].numpy()}}
        numpy_state["state"]["key"] = numpy_state["state"]["key"].astype(np.uint32)
    np.random.set_state(numpy_state)
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
