"""The process group of one run trained by several processes (DDP): who this process is, and what the ranks agree on.

torchrun describes the group in environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
a SLURM job of several tasks gets the same variables from submitit (`vitexp.run` exports them). Without them a
run is one process: every collective here is then a no-op that returns its input, so the single-process path
runs no distributed code at all.

Ranks agree on host decisions (stop here? which directory?) through a gloo group, also when the gradients go
through NCCL: a CPU all-reduce of a few integers does not wait for the GPU, so asking every step is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
# A rank that waits this long for the others fails instead of hanging: longer than anything rank 0 does alone
# between two collectives (a checkpoint, the figures), short enough that a rank 0 that failed there (its files,
# W&B) costs its job's GPUs minutes, not an hour.
TIMEOUT = timedelta(minutes=10)


@dataclass
class ProcessGroup:
    """This process's place in the run: rank, world size, local rank (its GPU on the node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: Any = field(default=None, repr=False)  # the gloo group for host-side agreement, once started

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ProcessGroup:
        """The group torchrun or submitit described; a lone process (no WORLD_SIZE, or 1) is a group of one."""
        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        return cls(int(environ["RANK"]), world_size, int(environ.get("LOCAL_RANK", "0")))

    @property
    def active(self) -> bool:
        """Whether there are other ranks (and so collectives to run)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes the run directory and talks to the logging services."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: on CUDA its local rank's GPU (modulo the GPUs it sees, in case SLURM binds one)."""
        if not self.active or device.type != "cuda":
            return device
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    @contextmanager
    def started(self, device: torch.device) -> Iterator[ProcessGroup]:
        """Join the other ranks (NCCL on CUDA, gloo on the CPU) while the block runs; nothing for a lone process."""
        if not self.active:
            yield self
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=TIMEOUT)
        try:
            self.host = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else dist.group.WORLD
            yield self
        finally:
            self.host = None
            dist.destroy_process_group()

    # --- collectives: each rank must call them in the same order ---------------------------------------------
    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order (any picklable object)."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.host)
        return values

    def max(self, values: list[int]) -> list[int]:
        """The element-wise maximum of integer flags over the ranks (on the host: no GPU sync)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host)
        return tensor.tolist()

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """A device bool that is True only where it is True on every rank (no host sync)."""
        if not self.active:
            return flag
        value = flag.to(torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value.bool()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks, as a new tensor."""
        if not self.active:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) in every rank's `module`: each rank's last step updated its own
        from its own slice, and evaluation must see the statistics that rank 0 saves."""
        if self.active:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
        if self.active:
            dist.barrier(group=self.host)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank `rank`'s random draws (augmentation, dropout) from optimizer step `step`: rank 0 keeps the
    run's own seed at step 0, so one process draws exactly as it always has."""
    if rank == 0 and step == 0:
        return seed
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63
