"""Real signals: a stopped run or sweep checkpoints, says how to resume, and exits with EXIT_STOPPED."""

from __future__ import annotations

import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY
from tests.sweeps import job_results, logged_epochs, report_rows, sweep_command, wait_for_epochs
from vitexp import checkpoint
from vitexp.cluster import EXIT_STOPPED

SINGLE = [*TINY, "data=digits", "trainer.epochs=12", "data.batch_size=128"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_a_stopped_single_run_exits_75_and_the_command_it_prints_resumes_it(
    tmp_path: Path, sig: signal.Signals
) -> None:
    run_dir = tmp_path / "run"
    command = ["python", str(REPO / "train.py"), *SINGLE, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(run_dir / "metrics.jsonl", 1)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED, stderr[-2000:]
    assert f"stopped by {sig.name}; {run_dir / 'last.pt'} holds the progress. Resume with:" in stderr
    progress = checkpoint.load(run_dir / "last.pt")["progress"]
    assert 1 <= progress["epoch"] < 12 and not (run_dir / "results.json").exists()

    resume = shlex.split(stderr.strip().splitlines()[-1])
    assert resume[-1] == f"hydra.run.dir={run_dir}"
    resumed = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert logged_epochs(run_dir / "metrics.jsonl") == list(range(1, 13))
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_a_sweep_in_one_process_stops_reports_and_resumes(tmp_path: Path) -> None:
    """Hydra's basic launcher runs every job in the launching process: USR2 must not cost the sweep."""
    sweep_dir = tmp_path / "sweep"
    args = sweep_command(sweep_dir, "aug=none,cutmix", "trainer.epochs=12")
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(sweep_dir / "0" / "metrics.jsonl", 1)
    launcher.send_signal(signal.SIGUSR2)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "2 of 2 jobs did not finish:" in stderr
    assert f"#0 aug=none: stopped by SIGUSR2; {sweep_dir / '0' / 'last.pt'} holds the progress" in stderr
    assert "#1 aug=cutmix: not started" in stderr
    assert "the sweep was stopped by SIGUSR2; resume it with:" in stderr
    resume = shlex.split(stderr.strip().splitlines()[-1])
    assert resume[-1] == f"hydra.sweep.dir={sweep_dir}" and "-m" in resume
    assert [row["status"].split(" ")[0] for row in report_rows(sweep_dir)] == ["0/1", "0/1"]
    assert (sweep_dir / "0" / "last.pt").exists() and not (sweep_dir / "1" / "last.pt").exists()

    relaunch = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0, 1]
    assert "resumed from" in (sweep_dir / "0" / "train.log").read_text()
    assert logged_epochs(sweep_dir / "0" / "metrics.jsonl") == list(range(1, 13))
    assert [row["status"] for row in report_rows(sweep_dir)] == ["1/1", "1/1"]
