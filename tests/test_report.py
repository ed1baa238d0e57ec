"""The sweep report from job directories written by hand (no training): cells by whatever keys vary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from tests.sweeps import report_rows
from vitexp.jobs import BASIC_SWEEPER, expected_jobs, search_space, sweep_jobs
from vitexp.report import write_report
from vitexp.report_plots import reliability_bins

DEFAULTS = {"model": "vit", "aug": "none", "smoothing": 0.0}


def fake_job(
    sweep_dir: Path,
    number: int,
    overrides: list[str],
    acc: float | None = None,
    error: str = "",
    val: float | None = None,
) -> None:
    """A job directory as a run leaves it: its overrides, and results and metrics when it finished (the best
    epoch's validation accuracy `val`, the test accuracy when not given)."""
    directory = sweep_dir / str(number)
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if acc is not None:
        val = acc if val is None else val
        test = {"acc": acc, "acc5": 1.0, "f1": acc - 0.01, "ece": 0.05, "confidence": acc + 0.05, "loss": 1 - acc}
        results = {"test": test, "best_val": {"acc": val, "loss": 1 - val}, "params": 15306, "epoch_time_s": 0.5}
        results |= {"data_wait": 0.02, "train_img_per_s": 2000.0, "wall_time_s": 1.5, "best_epoch": 2}
        (directory / "results.json").write_text(json.dumps(results))
        rows = [{"epoch": epoch, "val/acc": val * epoch / 2} for epoch in (1, 2)]
        (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if error:
        (directory / "failed.json").write_text(json.dumps({"error": error}))


def grid_config(params: dict[str, str], task: list[str], sweeper: str = BASIC_SWEEPER) -> dict:
    return {"sweeper": {"_target_": sweeper, "params": params}, "overrides": {"task": task}}


def test_two_varying_keys_get_a_pivot_and_a_heatmap(tmp_path: Path) -> None:
    accuracy = {("1e-3", "1"): 0.80, ("1e-3", "2"): 0.84, ("3e-4", "1"): 0.70, ("3e-4", "2"): 0.76}
    number = 0
    for (lr, depth), acc in accuracy.items():
        for seed, delta in ((0, -0.01), (1, 0.01)):  # two seeds per cell: the mean is `acc`
            fake_job(
                tmp_path, number, [f"optim.lr={lr}", f"model.depth={depth}", f"seed={seed}", "data=digits"], acc + delta
            )
            number += 1
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)

    text = report.markdown.read_text()
    assert "| optim.lr | model.depth | params | val acc | test acc |" in text
    assert "## test accuracy (%), optim.lr × model.depth" in text
    pivot = text[text.index("## test accuracy (%), optim.lr × model.depth") :].splitlines()
    assert pivot[2:6] == [  # rows and columns in numeric order, not the order the jobs ran
        "| optim.lr | model.depth=1 | model.depth=2 |",
        "|---|---|---|",
        "| 0.0003 | 70.00 ± 1.41 (n=2) | 76.00 ± 1.41 (n=2) |",
        "| 0.001 | 80.00 ± 1.41 (n=2) | 84.00 ± 1.41 (n=2) ★ |",  # the best val acc: fake_job's val is its acc
    ]
    rows = report_rows(tmp_path)
    assert list(rows[0])[:5] == ["model", "aug", "smoothing", "optim.lr", "model.depth"]
    assert [(row["optim.lr"], row["model.depth"], row["seeds_done"]) for row in rows] == [
        ("0.001", "1", "2"),
        ("0.001", "2", "2"),
        ("0.0003", "1", "2"),
        ("0.0003", "2", "2"),
    ]
    assert [round(float(row["test_acc_mean"]), 6) for row in rows] == [0.80, 0.84, 0.70, 0.76]
    assert {(row["model"], row["aug"], row["smoothing"]) for row in rows} == {("vit", "none", "0.0")}
    assert "data" not in rows[0] and "seed" not in rows[0]  # the same in every job / a repeat, not a column
    assert (tmp_path / "accuracy_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "val_curves.png").exists() and not (tmp_path / "ece_vs_smoothing.png").exists()


def test_three_varying_keys_get_one_pivot_per_value_of_the_third(tmp_path: Path) -> None:
    for number, (lr, depth, smoothing) in enumerate(
        (lr, depth, s) for lr in ("1e-3", "1e-2") for depth in (1, 2) for s in ("0", "0.1")
    ):
        fake_job(
            tmp_path, number, [f"optim.lr={lr}", f"model.depth={depth}", f"smoothing={smoothing}"], 0.5 + number / 100
        )
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)

    text = report.markdown.read_text()
    assert "## ε=0: test accuracy (%), optim.lr × model.depth" in text
    assert "## ε=0.1: test accuracy (%), optim.lr × model.depth" in text
    facet = text[text.index("## ε=0.1:") :].splitlines()
    assert facet[4:6] == ["| 0.001 | 51.00 (n=1) | 53.00 (n=1) |", "| 0.01 | 55.00 (n=1) | 57.00 (n=1) ★ |"]
    assert [row["smoothing"] for row in report_rows(tmp_path)] == ["0", "0.1"] * 4
    confidence = [round(float(row["test_confidence_mean"]), 6) for row in report_rows(tmp_path)]
    assert confidence == [round(0.55 + number / 100, 6) for number in range(8)]  # each job's acc + 0.05
    assert {path.name for path in report.plots} == {
        "accuracy_heatmap.png",
        "ece_vs_smoothing.png",
        "confidence_vs_smoothing.png",
        "val_curves.png",
    }


def test_one_varying_key_gets_accuracy_against_it(tmp_path: Path) -> None:
    for number, (lr, acc) in enumerate((("0.01", 0.6), ("0.001", 0.9), ("0.0001", 0.7))):
        fake_job(tmp_path, number, [f"optim.lr={lr}", "model.depth=1"], acc)
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)

    text = report.markdown.read_text()
    section = text[text.index("## test accuracy (%) by optim.lr") :].splitlines()
    assert section[2:] == [
        "| optim.lr | val acc | test acc | seeds |",
        "|---|---|---|---|",
        "| 0.0001 | 70.00 (n=1) | 70.00 (n=1) | 1/1 |",
        "| 0.001 | **90.00 (n=1)** ★ | 90.00 (n=1) | 1/1 |",
        "| 0.01 | 60.00 (n=1) | 60.00 (n=1) | 1/1 |",
    ]
    assert [(row["optim.lr"], row["test_acc_mean"]) for row in report_rows(tmp_path)] == [
        ("0.01", "0.6"),
        ("0.001", "0.9"),
        ("0.0001", "0.7"),
    ]
    assert {path.name for path in report.plots} == {"accuracy_vs_optim.lr.png", "val_curves.png"}
    assert (tmp_path / "accuracy_vs_optim.lr.png").read_bytes()[:4] == b"\x89PNG"


def test_classic_sweep_keeps_its_per_model_pivot_and_plots(tmp_path: Path) -> None:
    jobs = [(model, aug, s) for model in ("vit", "resnet18") for aug in ("none", "cutmix") for s in ("0", "0.1")]
    for number, (model, aug, smoothing) in enumerate(jobs):
        fake_job(tmp_path, number, [f"aug={aug}", f"smoothing={smoothing}", f"model={model}"], 0.9 - number / 100)
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)

    text = report.markdown.read_text()
    assert "| model | aug | smoothing | params | val acc | test acc |" in text
    assert "| resnet18 | cutmix | 0.1 | 15,306 | 83.00 (n=1) | 83.00 (n=1) |" in text
    resnet = text[text.index("## resnet18: test accuracy (%), aug × smoothing") :].splitlines()
    assert resnet[2:6] == [
        "| aug | ε=0 | ε=0.1 |",
        "|---|---|---|",
        "| none | 86.00 (n=1) | 85.00 (n=1) |",
        "| cutmix | 84.00 (n=1) | 83.00 (n=1) |",
    ]  # fmt: skip  (aug=none, the baseline, first)
    assert "## vit: test accuracy (%), aug × smoothing" in text
    assert {path.name for path in report.plots} == {
        "accuracy_heatmap.png",
        "ece_vs_smoothing.png",
        "confidence_vs_smoothing.png",
        "val_curves.png",
    }


def test_failed_and_never_started_jobs_show_in_the_status(tmp_path: Path) -> None:
    """`python -m vitexp.report` lists a grid's jobs from the sweep's config: ones without a directory too."""
    hydra = grid_config({"optim.lr": "1e-3,1e-2"}, ["model.depth=1,2", "data=digits"])
    hydra["runtime"] = {"choices": {"model": "vit", "aug": "none"}, "config_sources": []}
    OmegaConf.save(OmegaConf.create({"hydra": hydra, "smoothing": 0.0}), tmp_path / "multirun.yaml")
    fake_job(tmp_path, 0, ["optim.lr=1e-3", "model.depth=1", "data=digits"], 0.8)
    fake_job(tmp_path, 1, ["optim.lr=1e-3", "model.depth=2", "data=digits"], error="DataError: no images")
    result = subprocess.run(
        [sys.executable, "-m", "vitexp.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]

    status = {(row["optim.lr"], row["model.depth"]): row["status"] for row in report_rows(tmp_path)}
    assert status == {
        ("0.001", "1"): "1/1",
        ("0.001", "2"): "0/1 (#1 failed: DataError: no images)",
        ("0.01", "1"): "0/1 (#2 new)",
        ("0.01", "2"): "0/1 (#3 new)",
    }
    text = (tmp_path / "report.md").read_text()
    assert "| 0.001 | 80.00 (n=1) ★ | — |" in text and "0/1 (#1 failed: DataError: no images)" in text


def test_grid_and_directories_merge_by_job_number(tmp_path: Path) -> None:
    hydra = OmegaConf.create(grid_config({"aug": "none,cutmix"}, ["seed=0,1"]))
    expected = expected_jobs(hydra, tmp_path)
    assert expected is not None
    assert [job.overrides for job in expected] == [
        ["aug=none", "seed=0"],
        ["aug=none", "seed=1"],
        ["aug=cutmix", "seed=0"],
        ["aug=cutmix", "seed=1"],
    ]
    fake_job(tmp_path, 1, ["aug=none", "seed=1"], 0.5)
    (tmp_path / "7").mkdir()  # a directory with no recorded overrides (its job failed before it started)
    jobs = sweep_jobs(tmp_path, expected)
    assert [(job.number, job.directory.name) for job in jobs] == [(n, str(n)) for n in (0, 1, 2, 3, 7)]
    assert jobs[4].overrides == []
    assert expected_jobs(OmegaConf.create(grid_config({}, [], sweeper="optuna.OptunaSweeper")), tmp_path) is None


def test_a_sampling_sweepers_search_space_is_checked_value_by_value() -> None:
    params = {"optim.lr": "tag(log, interval(1e-4, 1e-1))", "model.depth": "choice(1,2)", "aug": "none,cutmix"}
    task = ["model.depth=range(2,5)", "data=digits", "aug=cutout"]  # the command line's setting of a key wins
    fixed, swept = search_space(OmegaConf.create(grid_config(params, task, sweeper="optuna.OptunaSweeper")))
    assert fixed == ["data=digits", "aug=cutout"]
    assert swept == {
        "optim.lr=tag(log, interval(1e-4, 1e-1))": ["optim.lr=0.0001", "optim.lr=0.1"],
        "model.depth=range(2,5)": ["model.depth=2", "model.depth=3", "model.depth=4"],
    }


def test_a_sweep_with_weight_averaging_reports_the_average_beside_the_weights(tmp_path: Path) -> None:
    for number, (aug, acc, ema) in enumerate((("none", 0.80, 0.83), ("cutmix", 0.70, 0.74))):
        fake_job(tmp_path, number, [f"aug={aug}", "trainer.ema_decay=0.99"], acc)
        results_path = tmp_path / str(number) / "results.json"
        results = json.loads(results_path.read_text())
        results_path.write_text(json.dumps(results | {"test_ema": {"acc": ema}, "best_ema_epoch": 2}))
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)
    rows = {row["aug"]: row for row in report_rows(tmp_path)}
    assert float(rows["none"]["test_ema_acc_mean"]) == 0.83 and float(rows["cutmix"]["test_ema_acc_mean"]) == 0.74
    text = report.markdown.read_text()
    assert "| test acc | macro F1 | ECE | confidence | NLL | EMA test acc |" in text and "| 83.00 (n=1) |" in text
    fake_job(tmp_path / "plain", 0, ["aug=none"], 0.8)
    plain = write_report(tmp_path / "plain", sweep_jobs(tmp_path / "plain", None), DEFAULTS)
    assert "EMA" not in plain.markdown.read_text() and "test_ema_acc_mean" not in report_rows(tmp_path / "plain")[0]


def test_a_sweep_reports_swa_the_epochs_jobs_stopped_at_and_selection_on_test(tmp_path: Path) -> None:
    extra = {
        ("none", 0): {"test_swa": {"acc": 0.81}, "stopped_epoch": 4, "selected_on_test": False},
        ("none", 1): {"test_swa": {"acc": 0.85}, "stopped_epoch": None, "selected_on_test": False},
        ("cutmix", 0): {"test_swa": {"acc": 0.72}, "stopped_epoch": 6, "selected_on_test": True},
    }
    for number, ((aug, seed), added) in enumerate(extra.items()):
        val = 0.95 if added["selected_on_test"] else None  # the best "validation" accuracy, measured on test
        fake_job(tmp_path, number, [f"aug={aug}", f"seed={seed}", "trainer.swa_start=2"], 0.8, val=val)
        results_path = tmp_path / str(number) / "results.json"
        results_path.write_text(json.dumps(json.loads(results_path.read_text()) | added))
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)
    rows = {row["aug"]: row for row in report_rows(tmp_path)}
    assert float(rows["none"]["test_swa_acc_mean"]) == pytest.approx(0.83) and rows["none"]["stopped_epochs"] == "4, —"
    assert rows["cutmix"]["stopped_epochs"] == "6" and rows["cutmix"]["selected_on_test"] == "True"
    assert rows["none"]["selected_on_test"] == "False" and "test_ema_acc_mean" not in rows["none"]
    assert (rows["none"]["best_by_val"], rows["cutmix"]["best_by_val"]) == ("True", "False")  # no test selection
    text = report.markdown.read_text()
    assert "| NLL | SWA test acc | stopped at epoch | epoch time (s) |" in text
    assert "| 83.00 ± 2.83 (n=2) | 4, — |" in text
    assert "**Selected on the test split**" in text and text.count("aug=cutmix") == 1


def test_the_seeds_tables_appear_when_their_keys_vary(tmp_path: Path) -> None:
    jobs = [
        (["model=resnet18"], {"name": "resnet18", "pretrained": True}, None),
        (["model=resnet18_attn", "model.attention=classic"], {"name": "resnet18_attn", "attention": "classic"}, 7),
        (["model=resnet18_attn", "model.attention=graph"], {"name": "resnet18_attn", "attention": "graph"}, None),
    ]
    for number, (overrides, model, stopped) in enumerate(jobs):
        fake_job(tmp_path, number, overrides, 0.7 + number / 10)
        path = tmp_path / str(number) / "results.json"
        results = json.loads(path.read_text())
        results["test"]["acc_svc"] = 0.6 + number / 10
        added = {
            "config": {"model": model},
            "epochs": 10,
            "stopped_epoch": stopped,
            "best_val": {"loss": 0.3, "l2": 0.0143},
        }
        path.write_text(json.dumps(results | added))
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)
    text = report.markdown.read_text()
    assert "| validation loss | accuracy (argmax) | accuracy (svc) | model params |" in text
    assert "| 0.01430 (n=1) | 80.00 (n=1) | 70.00 (n=1) | 15,306 |" in text  # the l2 it trained, seed 001's way
    seed_002 = text[text.index("## Seed 002's table") :].splitlines()
    assert seed_002[4:7] == [
        "| resnet18 | true | — | 10 | 70.00 (n=1) |",
        "| resnet18_attn | false | classic | 7 | 80.00 (n=1) |",
        "| resnet18_attn | false | graph | 10 | 90.00 (n=1) |",
    ]
    rows = report_rows(tmp_path)
    assert [round(float(row["test_acc_svc_mean"]), 6) for row in rows] == [0.6, 0.7, 0.8]
    assert "| SVC acc |" in text and "linear probe acc" not in text


def test_reliability_curves_per_smoothing_pool_the_seeds_bins(tmp_path: Path) -> None:
    bins = {  # per seed: (confidence, accuracy, count) of two bins
        0: [(0.55, 0.5, 10), (0.95, 0.8, 30)],
        1: [(0.65, 0.7, 30), (0.95, 1.0, 10)],
    }
    number = 0
    for aug in ("none", "cutmix"):
        for smoothing in ("0", "0.1"):
            for seed, seed_bins in bins.items():
                fake_job(tmp_path, number, [f"aug={aug}", f"smoothing={smoothing}", f"seed={seed}"], 0.8)
                drawn = [{"confidence": c, "accuracy": a, "count": n} for c, a, n in seed_bins]
                drawn.insert(1, {"confidence": None, "accuracy": None, "count": 0})
                figures = {"reliability": {"bins": drawn}}
                (tmp_path / str(number) / "figures.json").write_text(json.dumps(figures))
                number += 1
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS, aug="cutmix")
    assert "reliability_by_smoothing.png" in {path.name for path in report.plots}
    [cell] = [c for c in report.cells if c.setting["aug"] == "cutmix" and c.setting["smoothing"] == "0.1"]
    pooled = reliability_bins(cell)
    assert [b["count"] for b in pooled] == [40, 40]  # bin 0 of both seeds, then bin 2 of both
    assert pooled[0]["confidence"] == pytest.approx((0.55 * 10 + 0.65 * 30) / 40)
    assert pooled[1]["accuracy"] == pytest.approx((0.8 * 30 + 1.0 * 10) / 40)
