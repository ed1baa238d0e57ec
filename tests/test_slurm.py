"""Sweeps on a real single-node SLURM cluster (tests/slurm/cluster.sh): arrays, preemption, failures, bad grids.

CI starts the cluster before the tests; elsewhere these tests are skipped when no cluster answers.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.sweeps import assert_report_means, job_results, logged_epochs, sweep_command, wait_for_epochs
from tests.wandb_offline import offline_runs, read_offline_run

SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=60",
    "hydra.launcher.signal_delay_s=30",
]


pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def queue() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def slurm_sweep(sweep_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sweep_command(sweep_dir, *SLURM, *overrides),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sweep_runs_as_a_slurm_array_and_reports(tmp_path: Path) -> None:
    result = slurm_sweep(tmp_path / "sweep", "aug=none,cutmix", "seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(job_results(tmp_path / "sweep")) == [0, 1, 2, 3]
    logs = sorted((tmp_path / "sweep" / ".submitit").glob("*_*/*_log.out"))
    array_ids = {p.parent.name.split("_")[0] for p in logs}
    assert len(logs) == 4 and len(array_ids) == 1  # each job ran as a task of one SLURM array
    assert_report_means(tmp_path / "sweep", cells=2)
    for number in range(4):  # SLURM's CPUs for the task, not every core of the node, size the job's threads
        assert (
            "CPU budget 1 (SLURM_CPUS_PER_TASK): 1 torch thread(s)"
            in (tmp_path / "sweep" / str(number) / "train.log").read_text()
        )


def test_preempted_job_resumes_from_its_checkpoint_with_identical_weights(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # two identical jobs (log_every only changes logging): job 0 is preempted, job 1 is the reference
    args = sweep_command(
        sweep_dir,
        *SLURM,
        "trainer.epochs=25",
        "aug=cutmix",
        "model.dropout=0.1",
        "trainer.log_every=50,51",
        "logger=wandb",
        "logger.wandb.mode=offline",
    )
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = sweep_dir / "0" / "metrics.jsonl"
    wait_for_epochs(metrics, 3)
    [job] = [j for j in queue() if j.endswith("_0")]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends on preemption
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-3000:]

    log = (sweep_dir / "0" / "train.log").read_text()
    assert "received SIGUSR2: checkpointing at the next step" in log
    assert "resumed from" in log and log.count("test (best epoch") == 1
    assert logged_epochs(metrics) == list(range(1, 26))
    preempted = torch.load(sweep_dir / "0" / "last.pt", weights_only=False)
    reference = torch.load(sweep_dir / "1" / "last.pt", weights_only=False)
    assert preempted["progress"]["step"] == reference["progress"]["step"]
    for key, value in reference["model"].items():
        assert torch.equal(preempted["model"][key], value), key
    runs = [read_offline_run(folder) for folder in offline_runs(sweep_dir / "0")]
    assert len(runs) == 2 and runs[0]["run_id"] == runs[1]["run_id"]
    assert runs[0]["group"] == runs[1]["group"] == f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}"


def test_failing_job_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    result = slurm_sweep(tmp_path / "sweep", "data.batch_size=64,5000")
    assert result.returncode == 1
    assert sorted(job_results(tmp_path / "sweep")) == [0]
    assert "#1 data.batch_size=5000: ConfigError: data.batch_size=5000 x trainer.accumulate=1 is more" in result.stderr


def test_bad_grid_submits_nothing(tmp_path: Path) -> None:
    before = queue()
    result = slurm_sweep(tmp_path / "sweep", "smoothing=0,2")
    assert result.returncode == 2 and "job #1 (smoothing=2): smoothing=2.0 is not allowed" in result.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()
    assert set(queue()) <= set(before)  # no job was submitted (an earlier test's job may have left the queue)


def test_relaunch_after_killing_the_sweep_skips_finished_jobs_and_resumes_the_rest(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = sweep_command(
        sweep_dir,
        *SLURM,
        "hydra.launcher.array_parallelism=1",
        "aug=none,cutmix",
        "trainer.epochs=150",
        "data.limit_batches=2",  # short epochs: many of them, so job 1 is still training when the sweep is killed
    )
    launcher = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = sweep_dir / "1" / "metrics.jsonl"
    wait_for_epochs(metrics, 2)
    launcher.kill()  # the sweep dies: its launcher, then its jobs
    launcher.wait(30)
    for job in queue():
        subprocess.run(["scancel", "--full", "--signal=KILL", job], check=True)
    deadline = time.monotonic() + 60
    while queue() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (sweep_dir / "0" / "results.json").exists() and not (sweep_dir / "1" / "results.json").exists()
    finished = (sweep_dir / "0" / "last.pt").stat().st_mtime_ns

    relaunch = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0, 1]
    assert (sweep_dir / "0" / "last.pt").stat().st_mtime_ns == finished
    assert "resumed from" in (sweep_dir / "1" / "train.log").read_text()
    assert logged_epochs(metrics) == list(range(1, 151))


def test_an_optuna_search_runs_its_trials_as_slurm_jobs_two_at_a_time(tmp_path: Path) -> None:
    """hparams_search=optuna through the SLURM launcher: each batch of n_jobs trials is one array, each trial's value
    the best validation accuracy its job logged."""
    import optuna

    sweep_dir = tmp_path / "sweep"
    search = ["hparams_search=optuna", "+search=digits", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    result = slurm_sweep(sweep_dir, *search, "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{sweep_dir}/optuna.db")
    results = job_results(sweep_dir)
    assert [t.number for t in study.trials] == sorted(results) == [0, 1]
    assert [t.value for t in study.trials] == [results[n]["best_val"]["acc"] for n in (0, 1)]
    logs = sorted((sweep_dir / ".submitit").glob("*_*/*_log.out"))
    assert len(logs) == 2 and len({p.parent.name.split("_")[0] for p in logs}) == 1  # one array of two
