"""A job killed at the process level (the OOM killer, `kill -9`) still gets a summary, and a relaunch resumes it.

Real sweeps through the real launchers: submitit_local, and the local SLURM cluster (tests/slurm/cluster.sh;
these tests are skipped without one, except in CI) whose missing accounting leaves submitit waiting forever.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.sweeps import job_results, logged_epochs, report_rows, sweep_command, wait_for_epochs
from tests.test_slurm import SLURM
from vitexp.launcher import exit_text
from vitexp.rundir import FAILED_FILE, LOCK_FILE

GRID = ["aug=none,cutmix", "trainer.epochs=20"]  # job 0 is killed mid-run; job 1 finishes


def job_process(job_dir: Path) -> int:
    """The pid of the process training in `job_dir`: the one holding the job's lock file open."""
    lock = str(job_dir / LOCK_FILE)
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and any(os.readlink(fd) == lock for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # the process ended, or is not ours to inspect
            continue
    raise AssertionError(f"no process holds {lock}")


def sweep_killing_job_0(args: list[str], sweep_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the sweep and `kill -9` job 0's training process after 2 epochs; the sweep must end within `timeout`."""
    launcher = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for_epochs(sweep_dir / "0" / "metrics.jsonl", 2)
        os.kill(job_process(sweep_dir / "0"), signal.SIGKILL)
        stdout, stderr = launcher.communicate(timeout=timeout)
    finally:
        if launcher.poll() is None:  # a hang is a failure, not a stuck test run
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    return subprocess.CompletedProcess(args, launcher.returncode, stdout, stderr)


def reported_reason(result: subprocess.CompletedProcess[str], sweep_dir: Path) -> str:
    """The sweep failed cleanly, listing job 0 with its `failed.json` reason (returned) in stderr and the report."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "UncompletedJobError" not in result.stderr
    reason = json.loads((sweep_dir / "0" / FAILED_FILE).read_text())["error"]
    assert f"1 of 2 jobs did not finish:\n  #0 aug=none: {reason}\n" in result.stderr
    assert sorted(job_results(sweep_dir)) == [1]
    status = {row["aug"]: row["status"] for row in report_rows(sweep_dir)}
    assert status == {"none": f"0/1 (#0 failed: {reason})", "cutmix": "1/1"}
    assert f"0/1 (#0 failed: {reason})" in (sweep_dir / "report.md").read_text()
    return reason


def assert_relaunch_resumes_job_0(args: list[str], sweep_dir: Path) -> None:
    finished = (sweep_dir / "1" / "results.json").read_bytes()
    relaunch = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0, 1] and not (sweep_dir / "0" / FAILED_FILE).exists()
    assert (sweep_dir / "1" / "results.json").read_bytes() == finished
    assert "resumed from" in (sweep_dir / "0" / "train.log").read_text()
    assert logged_epochs(sweep_dir / "0" / "metrics.jsonl") == list(range(1, 21))


def test_killed_local_job_is_reported_and_resumed(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = sweep_command(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *GRID)
    reason = reported_reason(sweep_killing_job_0(args, sweep_dir, timeout=180), sweep_dir)
    assert re.fullmatch(
        r"its process \(submitit job (\d+)\) ended without a result:"
        r" killed \(by the out-of-memory killer or kill -9\?\) or crashed; submitit does not record which;"
        rf" log: {re.escape(str(sweep_dir))}/\.submitit/\1/\1_0_log\.err",
        reason,
    ), reason
    assert_relaunch_resumes_job_0(args, sweep_dir)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_killed_slurm_job_is_reported_and_resumed(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = sweep_command(sweep_dir, *SLURM, *GRID)
    reason = reported_reason(sweep_killing_job_0(args, sweep_dir, timeout=300), sweep_dir)
    accounting = subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0
    # without accounting, the state comes from slurmctld, which remembers an ended job for MinJobAge seconds
    state, source = ("", "") if accounting else ("NonZeroExitCode, ", ", as slurmctld reports")
    no_accounting = "" if accounting else r"; SLURM accounting is not available \(sacct: [^)]+\)"
    assert re.fullmatch(
        rf"SLURM job (\d+)_0 ended FAILED \({state}exit code 137:0: killed by SIGKILL \(out of memory\?\)\)"
        rf" without a result{source}{no_accounting}; log: {re.escape(str(sweep_dir))}/\.submitit/\1_0/\1_0_0_log\.err"
        r" \(srun: error: .*task 0: Killed\)",
        reason,
    ), reason
    assert_relaunch_resumes_job_0(args, sweep_dir)


def test_slurm_exit_codes_name_the_signal() -> None:
    assert exit_text("137:0") == "exit code 137:0: killed by SIGKILL (out of memory?)"  # the shell's 128 + 9
    assert exit_text("0:15") == "exit code 0:15: killed by SIGTERM"
    assert exit_text("1:0") == "exit code 1:0"
