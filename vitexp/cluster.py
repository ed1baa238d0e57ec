"""Stop signals: SLURM's warning signal (USR2) or a SIGTERM becomes a checkpoint at the next step.

SLURM (through submitit's `--signal=USR2@N`, or `scancel --signal=USR2` on preemption) sends USR2
before it kills a job; `kill` and `scancel` send SIGTERM. Neither ends the run mid-step: the signal only
asks the trainer to stop at the next step boundary. Once `last.pt` is written, a submitit job hands the
requeue back to submitit (which re-runs the same job, in the same directory, from that checkpoint), and
anything else ends with exit status `EXIT_STOPPED` and says how to resume.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

log = logging.getLogger("vitexp")

PREEMPT_SIGNAL = signal.SIGUSR2
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped with a checkpoint, running the same command again resumes


class StopSignals:
    """While active, USR2 and SIGTERM set `requested` instead of ending the process.

    Scopes nest: a sweep whose jobs run in its own process holds one for the whole sweep, and each job
    one of its own; a signal marks every active scope, and a scope opened after a signal inherits it,
    so the jobs after a stopped one do not start.
    """

    _active: ClassVar[list[StopSignals]] = []

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self.previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if StopSignals._active:
            self.requested = StopSignals._active[-1].requested
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        StopSignals._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        StopSignals._active.remove(self)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.warning("received %s: checkpointing at the next step, then %s", name, self.after_stop(signum))
        for scope in StopSignals._active:
            scope.requested = scope.requested or signal.Signals(signum)

    def agree(self, signum: int) -> None:
        """Another rank of the run received `signum`: this one stops at the same step, as if it had too."""
        self.requested = self.requested or signal.Signals(signum)

    def after_stop(self, signum: int) -> str:
        return "requeueing" if self.hands_to_submitit(signum) else "stopping"

    def hands_to_submitit(self, signum: int) -> bool:
        """Whether this is a submitit job whose own USR2 handler requeues it (a checkpointable job)."""
        return signum == PREEMPT_SIGNAL and in_submitit_job() and callable(self.submitit)

    @property
    def submitit(self) -> Any:
        return self.previous.get(PREEMPT_SIGNAL)

    def requeue(self) -> None:
        """Hand the requeue to submitit's handler: it pickles the job again, requeues it and exits."""
        self.submitit(PREEMPT_SIGNAL, None)


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def resume_command(directory_key: str, directory: Path, program: Sequence[str] = ("python",)) -> str:
    """This process's command line, pinned to `directory`: the default run and sweep directories are
    time-stamped, so the bare command would start over in a new one. `program` runs it (torchrun's options
    for a run on several processes)."""
    args = [arg for arg in sys.argv if not arg.startswith(f"{directory_key}=")]
    return shlex.join([*program, *args, f"{directory_key}={directory}"])


def available_cpus() -> int:
    """The CPUs this process may run on (SLURM and taskset restrict it below the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
