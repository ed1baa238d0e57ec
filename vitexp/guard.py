"""Non-finite training: steps with a non-finite loss or gradient are skipped and counted on the device,
and non-finite weights never reach a checkpoint.

Counting on the device keeps the step loop free of GPU syncs; the counters are read every
`trainer.log_every` steps, at the end of each epoch and before each checkpoint, which is where a run
with too long a streak of skipped steps stops.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vitexp import checkpoint

log = logging.getLogger("vitexp")


class NonFiniteError(RuntimeError):
    """Training diverged: too many non-finite steps in a row, or non-finite weights or metrics.

    Raised before anything non-finite reaches a checkpoint or results.json.
    """


class NonFiniteSteps:
    """Device counters of skipped steps (total, current streak, longest streak since the last read)."""

    def __init__(self, device: torch.device, limit: int) -> None:
        self.limit = limit
        self.counts = torch.zeros(3, dtype=torch.long, device=device)
        self.total = self.streak = 0  # as of the last read

    def record(self, finite: torch.Tensor) -> None:
        """Count one optimizer step, skipped unless `finite` (a device bool): no sync."""
        total, streak, longest = self.counts.unbind()
        total.add_(~finite)
        streak.copy_(torch.where(finite, 0, streak + 1))
        longest.copy_(torch.maximum(longest, streak))

    def restore(self, total: int, streak: int) -> None:
        """Continue the counts of a checkpoint."""
        self.total, self.streak = total, streak
        self.counts = torch.tensor([total, streak, streak], device=self.counts.device)

    def read_nonfinite(self, step: int) -> None:
        """Copy the counters to the host (one transfer); warn about new skips, stop if a streak got too long."""
        total, streak, longest = self.counts.tolist()
        if total > self.total:
            log.warning(
                "non-finite loss or gradients in %d steps by step %d: those steps were skipped (%d in a row now)",
                total - self.total,
                step,
                streak,
            )
        self.total, self.streak = total, streak
        if longest >= self.limit:
            raise NonFiniteError(
                f"loss or gradients were non-finite for {longest} consecutive steps "
                f"(trainer.max_nonfinite={self.limit}); stopping without saving NaN weights. "
                "Try a lower optim.lr or trainer.clip_grad_norm, or trainer.precision=fp32"
            )


def check_weights(weights: dict[str, Any], step: int, file_name: str) -> None:
    """Refuse to save non-finite weights: the run fails, keeping its last good checkpoint."""
    broken = checkpoint.nonfinite_tensors(weights)
    if broken:
        raise NonFiniteError(
            f"the weights became non-finite by step {step} "
            f"({', '.join(broken[:3])}{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}); "
            f"{file_name} was not written. Try a lower optim.lr, trainer.clip_grad_norm or sched.warmup_epochs"
        )
