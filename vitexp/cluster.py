"""Preemption on SLURM: turn the warning signal into a checkpoint at the next step, then requeue.

SLURM (through submitit's `--signal=USR2@N`, or `scancel --signal=USR2` on preemption) sends USR2
before it kills a job. submitit's own handler would requeue at once, mid-step; instead the signal only
asks the trainer to stop at the next step boundary, and once `last.pt` is written the requeue is
handed back to submitit (which re-runs the same job, in the same directory, from that checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Any

log = logging.getLogger("vitexp")

PREEMPT_SIGNAL = signal.SIGUSR2


class PreemptionHandler:
    """Installed for the duration of a run: `requested` turns true when USR2 arrives."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def __enter__(self) -> PreemptionHandler:
        self.previous = signal.signal(PREEMPT_SIGNAL, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(PREEMPT_SIGNAL, self.previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: checkpointing at the next step, then requeueing", signal.Signals(signum).name)
        self.requested = True

    def requeue(self) -> None:
        """Requeue this job after its checkpoint is written, then end the process."""
        if callable(self.previous):  # submitit's handler: pickles the job again, `scontrol requeue`, exits
            self.previous(PREEMPT_SIGNAL, None)
        job_id = slurm_job_id()
        if job_id:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            log.info("requeued SLURM job %s", job_id)
        else:
            log.info("stopped; run the same command again to resume")
        sys.exit(0)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: the array task's own id for an array job."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")
