"""The hardware a run uses: its device, number format and host threads; every choice that asks what the
machine can do.

Kept apart from the loop so that the few calls into CUDA-only APIs sit in one place, each with a CPU
answer that runs (and is tested) on any machine.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vitexp.config import ConfigError


def select_device(name: str) -> torch.device:
    """`trainer.device`: auto picks CUDA when there is one; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} is not allowed: no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` is bf16 on a GPU that has it (`bf16_supported`, asked of
    the GPU when None), else fp16 with a GradScaler; fp32 on the CPU, where mixed precision is slower."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass, or nothing in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    """The GPU's model, or the CPU's architecture and torch's thread count, for benchmark headers."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a GPU; None for the CPU, whose memory the data is already in."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the GPU: copied from pinned memory on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_rng_state() -> list[torch.Tensor]:
    """Every GPU's random state, for a checkpoint; none without CUDA."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def set_cuda_rng_state(states: list[torch.Tensor]) -> None:
    """Restore `cuda_rng_state()`; a checkpoint from a GPU run resumed on the CPU has nothing to restore."""
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)


@dataclass(frozen=True)
class ThreadPlan:
    """How a run's CPU budget is split between torch's threads and DataLoader workers.

    Torch uses every core by default, and each DataLoader worker is a process of its own: on a shared node,
    or with several jobs on one machine, they oversubscribe the cores and a step can take 30x longer.
    """

    budget: int | None  # CPUs this run may use; None: no limit known, torch's default
    source: str  # where the budget came from
    workers: int  # DataLoader workers (data.num_workers, lowered to fit the budget)

    def training_threads(self, loaders: bool) -> int | None:
        """Torch threads for training: the budget less the DataLoader workers when batches come through them."""
        if self.budget is None:
            return None
        return max(1, self.budget - self.workers) if loaders else self.budget

    def describe(self, loaders: bool) -> str:
        threads = self.training_threads(loaders)
        workers = f", {self.workers} DataLoader worker(s)" if loaders else ""
        if threads is None:
            return f"torch's default of {torch.get_num_threads()} thread(s){workers}"
        return f"CPU budget {self.budget} ({self.source}): {threads} torch thread(s){workers}"


def plan_threads(
    requested: int | None, launcher_cpus: int | None, num_workers: int, environ: Mapping[str, str] = os.environ
) -> ThreadPlan:
    """The CPU budget: `trainer.threads`, else SLURM's CPUs for the task, else the launcher's `cpus_per_task`,
    else none (a lone run keeps torch's default). Workers leave at least one CPU of it to training."""
    budget, source = requested, "trainer.threads"
    if budget is None and environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        budget, source = int(environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    if budget is None and launcher_cpus:
        budget, source = launcher_cpus, "hydra.launcher.cpus_per_task"
    if budget is None:
        return ThreadPlan(None, "", num_workers)
    return ThreadPlan(budget, source, min(num_workers, budget - 1))
