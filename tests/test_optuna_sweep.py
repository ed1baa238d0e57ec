"""A real Optuna sweep (hydra-optuna-sweeper): its search space is checked value by value before launch, and
its jobs, which no list names in advance, are summarised and reported from their directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.sweeps import job_results, report_rows, sweep

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
    result = sweep(tmp_path / "sweep", *OPTUNA, "optim.lr=interval(-1,1e-2)", "model.nonexistent=choice(1,2)")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: nothing was launched; fix these values first:" in result.stderr
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


def test_hparams_search_keeps_its_study_in_the_sweep_directory(tmp_path: Path) -> None:
    """`hparams_search=optuna +search=<space>`: TPE with a fixed seed, the study in <sweep dir>/optuna.db, each trial's
    value the best validation accuracy of its run (never a test metric)."""
    import optuna
    from omegaconf import OmegaConf

    sweep_dir = tmp_path / "sweep"
    result = sweep(sweep_dir, "hparams_search=optuna", "+search=digits", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{sweep_dir}/optuna.db")
    results = job_results(sweep_dir)
    assert [trial.number for trial in study.trials] == sorted(results) == [0, 1]
    for trial in study.trials:
        run = results[trial.number]
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == run["best_val"]["acc"]
        assert trial.value != run["test"]["acc"]
        assert trial.params["optim.lr"] == run["config"]["optim"]["lr"] and trial.params["aug"] == run["choices"]["aug"]
        assert 1e-3 <= trial.params["optim.lr"] <= 1e-2 and 0 <= trial.params["smoothing"] <= 0.2
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == max(run["best_val"]["acc"] for run in results.values()) == study.best_value
