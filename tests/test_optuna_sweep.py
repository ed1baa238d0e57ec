"""A real Optuna sweep (hydra-optuna-sweeper): its search space is checked value by value before launch, and
its jobs, which no list names in advance, are summarised and reported from their directories."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tests.conftest import REPO, run_train
from tests.sweeps import job_results, report_rows, sweep, sweep_command
from tests.wandb_offline import offline_runs, read_offline_run

OPTUNA = ["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0"]


def test_optuna_sweep_reports_each_trial_by_its_sampled_value(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, *OPTUNA, "hydra.sweeper.n_trials=2", "optim.lr=interval(1e-3,1e-2)")
    assert result.returncode == 0, result.stderr[-3000:]
    results = job_results(sweep_dir)
    assert sorted(results) == [0, 1]
    lrs = {number: r["config"]["optim"]["lr"] for number, r in results.items()}
    assert len(set(lrs.values())) == 2 and all(1e-3 <= lr < 1e-2 for lr in lrs.values())

    rows = report_rows(sweep_dir)
    assert [float(row["optim.lr"]) for row in rows] == [lrs[0], lrs[1]]  # one cell per trial, in trial order
    for number, row in enumerate(rows):
        assert float(row["test_acc_mean"]) == results[number]["test"]["acc"]
        assert (row["seeds_done"], row["status"], row["model"], row["aug"]) == ("1", "1/1", "vit", "none")
    assert "model.depth" not in rows[0]  # the same in both trials: not a column
    assert (sweep_dir / "accuracy_vs_optim.lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "## test accuracy (%) by optim.lr" in (sweep_dir / "report.md").read_text()

    written = (sweep_dir / "report.csv").read_text()
    rewrite = subprocess.run(
        [sys.executable, "-m", "vitexp.report", str(sweep_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rewrite.returncode == 0, rewrite.stderr[-3000:]
    assert (sweep_dir / "report.csv").read_text() == written  # from the directory alone, after the sweep


def test_a_bad_search_space_launches_nothing_and_names_the_parameter(tmp_path: Path) -> None:
    """Also Optuna's default direction, minimize, for the default objective, the validation accuracy."""
    bad = ["optim.lr=interval(-1,1e-2)", "model.nonexistent=choice(1,2)"]
    result = sweep(tmp_path / "sweep", "hydra/sweeper=optuna", *bad)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: nothing was launched; fix these values first:" in result.stderr
    assert (
        "hydra.sweeper.direction=minimize would search for the worst val/acc: set hydra.sweeper.direction="
        "maximize (hparams_search.direction=maximize with hparams_search=optuna)" in result.stderr
    )
    assert "optim.lr=interval(-1,1e-2) at -1.0: optim.lr=-1.0 is not allowed: expected a float > 0" in result.stderr
    assert "model.nonexistent=choice(1,2) at 1: Could not override 'model.nonexistent'." in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_dry_run_shows_the_values_it_checked(tmp_path: Path) -> None:
    result = sweep(
        tmp_path / "sweep", *OPTUNA, "dry_run=true", "hydra.sweeper.n_trials=5", "optim.lr=tag(log,interval(1e-4,1e-2))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OptunaSweeper samples its jobs, 5 trials; each value below was checked" in result.stdout
    assert "  optim.lr=tag(log,interval(1e-4,1e-2)): 0.0001, 0.01" in result.stdout
    assert not (tmp_path / "sweep").exists()


def study_of(sweep_dir: Path, name: str = "digits") -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def val_metric(run_dir: Path, metric: str) -> list[float]:
    return [json.loads(line)[metric] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def best_command(report: str) -> list[str]:
    return shlex.split(report.split("Rerun it on its own:\n\n    ")[1].splitlines()[0])


def test_a_killed_search_relaunched_continues_its_study_to_n_trials(tmp_path: Path) -> None:
    """4 trials, 2 at a time under submitit_local; the sweep is killed while its first two trials train. The same
    command resumes those two from their checkpoints (same numbers, directories, parameters) and asks 2 more; a
    third launch finds the study complete and asks none. The report ranks the trials by the objective."""
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "sweep"
    search = ["hparams_search=optuna", "+search=digits", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2"]
    args = sweep_command(sweep_dir, *search, "hydra/launcher=submitit_local", "trainer.epochs=5")
    launcher = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not all((sweep_dir / n / "last.pt").exists() for n in "01") and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)  # the sweep and its jobs die mid-training
    launcher.wait(30)
    assert [t.state for t in study_of(sweep_dir).trials] == [TrialState.RUNNING] * 2
    assert not list(sweep_dir.glob("*/results.json"))
    first_params = [t.params for t in study_of(sweep_dir).trials]

    relaunch = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    study, results = study_of(sweep_dir), job_results(sweep_dir)
    assert [t.number for t in study.trials] == sorted(results) == [0, 1, 2, 3]
    assert [t.params for t in study.trials[:2]] == first_params  # the interrupted trials, not new ones
    for trial in study.trials:
        run_dir = sweep_dir / str(trial.number)
        assert trial.state == TrialState.COMPLETE and trial.value == max(val_metric(run_dir, "val/acc"))
        assert trial.params["optim.lr"] == results[trial.number]["config"]["optim"]["lr"]
        assert val_metric(run_dir, "epoch") == [1, 2, 3, 4, 5]
    for number in (0, 1):
        assert "resumed from" in (sweep_dir / str(number) / "train.log").read_text()
    for number in range(4):  # n_jobs=2 at a time on 2 CPUs: one each, in every batch
        log = (sweep_dir / str(number) / "train.log").read_text()
        assert "CPU budget 1 (hydra.launcher.cpus_per_task): 1 torch thread(s)" in log
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == max(r["best_val"]["acc"] for r in results.values()) == study.best_value
    assert best.best_trial == study.best_trial.number and best.metric == "val/acc"

    report = (sweep_dir / "report.md").read_text()
    assert "4 trials: 4 complete, 0 failed." in report
    ranked = sorted(study.trials, key=lambda t: -t.value)
    with (sweep_dir / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["trial"]) for row in rows] == [t.number for t in ranked]
    assert [float(row["test_acc"]) for row in rows] == [results[t.number]["test"]["acc"] for t in ranked]
    lr = ranked[0].params["optim.lr"]
    assert f"**Best trial: #{ranked[0].number}**, val/acc {ranked[0].value:.4f}" in report
    command = best_command(report)
    assert command[:2] == ["python", "train.py"] and f"optim.lr={lr}" in command and "data=digits" in command
    assert not [word for word in command if "search" in word or word.startswith("hydra")]
    importances = json.loads((sweep_dir / "search_importances.json").read_text())
    assert set(importances) == {"optim.lr", "smoothing", "aug"} and abs(sum(importances.values()) - 1) < 1e-6
    for plot in ("search_history.png", "search_importances.png"):
        assert (sweep_dir / plot).read_bytes()[:4] == b"\x89PNG"

    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(study_of(sweep_dir).trials) == 4 and job_results(sweep_dir) == results

    other = ["hparams_search.metric=val/loss", "hparams_search.direction=minimize"]
    refused = subprocess.run([*args, *other], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "searches for the best val/acc (maximize), not val/loss (minimize): a relaunch continues" in refused.stderr


def test_a_stopped_search_asks_no_more_trials_until_relaunched(tmp_path: Path) -> None:
    """USR2 stops the trial training in the sweep's process at a checkpoint; the trial stays RUNNING for the
    relaunch, and the search does not sample the rest of its trials blind while none can run."""
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "sweep"
    args = sweep_command(sweep_dir, "hparams_search=optuna", "+search=digits", "hydra.sweeper.n_trials=3")
    launcher = subprocess.Popen(
        [*args, "trainer.epochs=6"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (sweep_dir / "0" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGUSR2)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 75, stderr[-3000:]
    assert [t.state for t in study_of(sweep_dir).trials] == [TrialState.RUNNING]
    assert json.loads((sweep_dir / "0" / "failed.json").read_text())["stopped"] is True


def test_a_search_on_val_loss_minimises_it_and_its_best_command_reruns_the_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir,
        "hparams_search=optuna",
        "+search=digits",
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=2",
        "hparams_search.metric=val/loss",
        "hparams_search.direction=minimize",
        "logger=wandb",
        "logger.wandb.mode=offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(sweep_dir)
    for trial in study.trials:
        assert trial.value == min(val_metric(sweep_dir / str(trial.number), "val/loss"))
    assert study.best_value == min(t.value for t in study.trials)
    runs = [read_offline_run(offline_runs(sweep_dir / str(n))[0]) for n in range(2)]  # W&B: one group, the trial
    assert [run["config"]["trial"] for run in runs] == [0, 1] and len({run["group"] for run in runs}) == 1
    assert runs[0]["group"].startswith("search_digits-")

    command = best_command((sweep_dir / "report.md").read_text())
    assert command[:2] == ["python", "train.py"]
    rerun = run_train(*command[2:], f"hydra.run.dir={tmp_path / 'rerun'}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert min(val_metric(tmp_path / "rerun", "val/loss")) == study.best_value  # the same run, on its own


def test_diverged_trials_fail_and_too_many_failures_stop_the_search(tmp_path: Path) -> None:
    """A std of 1e-39 makes every loss non-finite: each trial fails (never a number told to Optuna), and more than
    max_failure_rate=0.5 of n_trials=4 failing stops the search after its third trial."""
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir,
        "hparams_search=optuna",
        "+search=digits",
        "hydra.sweeper.n_trials=4",
        "data.std=[1e-39,1e-39,1e-39]",
        "trainer.epochs=1",
    )
    assert result.returncode == 1
    study = study_of(sweep_dir)
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.FAIL, None)] * 3
    assert "the search stopped asking trials: 3 of 3 failed, more than hydra.sweeper.max_failure_rate=0.5" in (
        result.stderr
    )
    assert "3 of 3 jobs did not finish" in result.stderr and not (sweep_dir / "optimization_results.yaml").exists()
    assert "3 trials: 0 complete, 3 failed." in (sweep_dir / "report.md").read_text()


def test_a_grid_sampler_runs_its_grid_once_and_reports_the_best(tmp_path: Path) -> None:
    """Optuna's GridSampler ends the study when its grid is done (raising from `tell`, which the sweeper expects):
    5 trials asked of a grid of 2 run 2."""
    sweep_dir = tmp_path / "sweep"
    grid = ["hydra/sweeper/sampler=grid", "hydra.sweeper.n_trials=5", "aug=choice(none,cutmix)", "trainer.epochs=1"]
    result = sweep(sweep_dir, *OPTUNA[:2], *grid)
    assert result.returncode == 0, result.stderr[-3000:]
    results = job_results(sweep_dir)
    assert sorted(results) == [0, 1] and {r["choices"]["aug"] for r in results.values()} == {"none", "cutmix"}
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == max(r["best_val"]["acc"] for r in results.values())
