"""Multirun sweeps through Hydra's basic launcher and submitit_local: grid checks, failures, relaunch, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO
from tests.sweeps import assert_report_means, job_results, logged_epochs, report_rows, sweep, sweep_command
from tests.wandb_offline import offline_runs, read_offline_run
from vitexp.cluster import available_cpus

GRID = ["aug=none,cutmix", "seed=0,1"]


def test_basic_launcher_runs_the_grid_reports_means_and_groups_wandb_runs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "2026-11-23" / "12-00-00"
    result = sweep(sweep_dir, *GRID, "logger=wandb", "logger.wandb.mode=offline")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0, 1, 2, 3]
    assert_report_means(sweep_dir, cells=2)
    report = (sweep_dir / "report.md").read_text()
    assert "| vit | cutmix | 0 |" in report and "## vit: test accuracy (%), aug × smoothing" in report
    runs = [read_offline_run(offline_runs(sweep_dir / str(n))[0]) for n in range(4)]
    assert len({run["run_id"] for run in runs}) == 4  # one W&B run per job, never merged
    assert {run["group"] for run in runs} == {"sweep-2026-11-23-12-00-00"}
    assert runs[3]["name"].endswith("aug=cutmix,seed=1") and runs[3]["job_type"] == "vit"
    [report_run] = [read_offline_run(folder) for folder in offline_runs(sweep_dir)]
    assert report_run["group"] == "sweep-2026-11-23-12-00-00" and report_run["job_type"] == "report"
    assert [row["sweep_report.nrows"] for row in report_run["history"]] == [2]  # the table, one row per cell


def test_named_sweep_combines_with_shell_overrides(tmp_path: Path) -> None:
    result = sweep(tmp_path / "sweep", "+sweep=aug_smoothing", "seed=0,1", "dry_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "32 jobs" in result.stdout
    assert "aug=cutmix smoothing=0.2" in result.stdout and "seed=1" in result.stdout
    assert not list((tmp_path / "sweep").glob("*/")), "a dry run launches nothing"
    warning = "warning: sched.warmup_epochs=5 >= trainer.epochs=2: the learning rate never reaches optim.lr"
    assert result.stderr.count(warning) == 1  # once for the grid, not once per job


def test_a_sweep_over_a_key_no_schema_has_launches_nothing(tmp_path: Path) -> None:
    result = sweep(tmp_path / "sweep", "+trainer.epoch=3,4")  # 2 jobs that would be identical
    assert result.returncode == 2
    assert "nothing was launched" in result.stderr
    assert "job #1 (+trainer.epoch=4): unknown config key, nothing would read it: trainer.epoch (did you mean" in (
        result.stderr
    )
    assert not [p for p in (tmp_path / "sweep").glob("*") if p.is_dir()]


def test_submitit_local_launcher(tmp_path: Path) -> None:
    result = sweep(
        tmp_path / "sweep", "aug=none,cutmix", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(job_results(tmp_path / "sweep")) == [0, 1]
    assert_report_means(tmp_path / "sweep", cells=2)
    share = max(1, available_cpus() // 2)  # both jobs run at once: each gets half the CPUs, not all of them
    for number in (0, 1):
        log = (tmp_path / "sweep" / str(number) / "train.log").read_text()
        assert f"CPU budget {share} (hydra.launcher.cpus_per_task): {share} torch thread(s)" in log


def test_bad_grid_launches_nothing(tmp_path: Path) -> None:
    result = sweep(tmp_path / "sweep", "smoothing=0,0.1,1.5", "aug=none,cutmix")
    assert result.returncode == 2
    assert "nothing was launched" in result.stderr
    assert "job #4 (smoothing=1.5 aug=none): smoothing=1.5 is not allowed: expected a float in [0, 1)" in result.stderr
    assert "job #5" in result.stderr  # every bad job is listed, not just the first
    assert not [p for p in (tmp_path / "sweep").glob("*") if p.is_dir()]


def test_failing_job_does_not_stop_the_others(tmp_path: Path) -> None:
    # a batch larger than the training set passes config checks but fails when the data is loaded
    result = sweep(tmp_path / "sweep", "data.batch_size=64,5000", "aug=none")
    assert result.returncode == 1
    assert sorted(job_results(tmp_path / "sweep")) == [0]
    assert "1 of 2 jobs did not finish" in result.stderr
    assert "#1 data.batch_size=5000: ConfigError: data.batch_size=5000 x trainer.accumulate=1 is more" in result.stderr
    rows = report_rows(tmp_path / "sweep")
    assert [row["status"].split(" ")[0] for row in rows] == ["1/1", "0/1"]
    assert "#1 failed" in rows[1]["status"]


def test_a_diverged_job_is_a_failed_job(tmp_path: Path) -> None:
    """A std of 1e-39 scales every input to infinity: every loss is non-finite (a diverged run, quickly)."""
    result = sweep(tmp_path / "sweep", "data.std=[0.5,0.5,0.5],[1e-39,1e-39,1e-39]", "aug=none")
    assert result.returncode == 1
    assert sorted(job_results(tmp_path / "sweep")) == [0]
    failure = json.loads((tmp_path / "sweep" / "1" / "failed.json").read_text())["error"]
    assert failure.startswith("NonFiniteError: loss or gradients were non-finite for 10 consecutive steps")
    assert "#1 data.std=[1e-39,1e-39,1e-39]: NonFiniteError: loss or gradients were non-finite" in result.stderr
    assert not list((tmp_path / "sweep" / "1").glob("*.pt"))


def test_relaunch_skips_finished_jobs_and_resumes_the_killed_one(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = sweep_command(sweep_dir, "aug=none,cutout,cutmix", "trainer.epochs=4")
    launcher = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (sweep_dir / "1" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the whole sweep dies, mid-way through job 1
    launcher.wait(30)
    assert (sweep_dir / "0" / "results.json").exists() and not (sweep_dir / "1" / "results.json").exists()
    first_results = (sweep_dir / "0" / "results.json").read_bytes()
    first_mtime = (sweep_dir / "0" / "last.pt").stat().st_mtime_ns

    relaunch = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0, 1, 2]
    assert (sweep_dir / "0" / "results.json").read_bytes() == first_results
    assert (sweep_dir / "0" / "last.pt").stat().st_mtime_ns == first_mtime
    log = (sweep_dir / "1" / "train.log").read_text()
    assert "resumed from" in log
    assert logged_epochs(sweep_dir / "1" / "metrics.jsonl") == [1, 2, 3, 4]


def test_relaunch_with_a_changed_config_is_refused(tmp_path: Path) -> None:
    assert sweep(tmp_path / "sweep", "aug=none").returncode == 0
    result = sweep(tmp_path / "sweep", "aug=none", "smoothing=0.3")
    assert result.returncode == 2
    assert f"{tmp_path / 'sweep' / '0'} holds a run of another config (smoothing: 0.0 -> 0.3)" in result.stderr


def test_a_digits_sweep_with_averages_and_early_stopping_reports_them(tmp_path: Path) -> None:
    """EMA and SWA on every job; early stopping on one, told that only a gain of 1.0 in accuracy counts."""
    techniques = ["trainer.epochs=4", "trainer.ema_decay=0.9", "trainer.swa_start=2", "trainer.early_stop_min_delta=1"]
    result = sweep(tmp_path / "sweep", *techniques, "trainer.early_stop_patience=0,2")
    assert result.returncode == 0, result.stderr[-3000:]
    results = job_results(tmp_path / "sweep")
    assert "stopped_epoch" not in results[0]  # no early stopping asked
    assert results[1]["stopped_epoch"] == 3 and results[1]["swa_epochs"] == 2 and results[0]["swa_epochs"] == 3
    rows = {row["trainer.early_stop_patience"]: row for row in report_rows(tmp_path / "sweep")}
    assert rows["2"]["stopped_epochs"] == "3" and rows["0"]["stopped_epochs"] == "—"
    for key, number in (("test_ema", 1), ("test_swa", 1), ("test_swa", 0)):
        assert float(rows[str(number * 2)][f"{key}_acc_mean"]) == results[number][key]["acc"]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "| EMA test acc | SWA test acc | stopped at epoch |" in report
    assert f"| {100 * results[1]['test_swa']['acc']:.2f} (n=1) | 3 |" in report
