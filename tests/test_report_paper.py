"""The sweep report as a paper needs it, from job directories written by hand (no training): seed counts in
every cell, selection on validation, one row per job, images/s and jobs that shared a host, labelled figures
in PNG and PDF."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from omegaconf import OmegaConf

from tests.sweeps import report_rows
from tests.test_report import DEFAULTS, fake_job, grid_config
from vitexp.cells import collect
from vitexp.jobs import expected_jobs, sweep_jobs
from vitexp.report import fmt, write_report
from vitexp.report_plots import figures, heatmap, text_colour


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """write_report without its figures, for a test of its tables: drawing them takes most of its time."""
    monkeypatch.setattr("vitexp.report.plot", lambda *args: [])


def edit_results(sweep_dir: Path, number: int, **changes: Any) -> None:
    """Change or add top-level fields of a finished job's results.json (`test` merges into its test metrics)."""
    path = sweep_dir / str(number) / "results.json"
    results = json.loads(path.read_text())
    results["test"] |= changes.pop("test", {})
    path.write_text(json.dumps(results | changes))


def runs_rows(sweep_dir: Path) -> list[dict[str, str]]:
    import csv

    with (sweep_dir / "runs.csv").open() as file:
        return list(csv.DictReader(file))


def table_row(text: str, start: str) -> list[str]:
    """The cells of the report.md table row that starts with `start`."""
    [line] = [line for line in text.splitlines() if line.startswith(start)]
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.usefixtures("no_plots")
def test_cells_show_mean_std_and_seed_count_and_one_seed_shows_no_spread(tmp_path: Path) -> None:
    for number, (lr, seed, acc) in enumerate(
        (("1e-3", 0, 0.80), ("1e-3", 1, 0.82), ("1e-3", 2, 0.84), ("1e-2", 0, 0.7))
    ):
        fake_job(tmp_path, number, [f"optim.lr={lr}", f"seed={seed}"], acc)
    text = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS).markdown.read_text()

    three, one = table_row(text, "| 0.001 | 15,306 |"), table_row(text, "| 0.01 | 15,306 |")
    assert three[2:4] == ["**82.00 ± 2.00 (n=3)** ★", "82.00 ± 2.00 (n=3)"]  # val acc, test acc
    assert three[5] == "0.0500 ± 0.0000 (n=3)"  # ECE: three equal seeds do have a spread of 0
    assert one[2:4] == ["70.00 (n=1)", "70.00 (n=1)"] and "(n=1)" in one[5]
    assert "± 0.00 (n=1)" not in text and "± 0.0000 (n=1)" not in text
    assert fmt([]) == "—" and fmt([0.5], digits=1) == "0.5 (n=1)" and fmt([1.0, 3.0]) == "2.00 ± 1.41 (n=2)"


@pytest.mark.usefixtures("no_plots")
def test_the_best_cell_is_selected_by_validation_accuracy_never_by_test(tmp_path: Path) -> None:
    """cutmix ε=0.1 has the best test accuracy, none ε=0.1 the best validation accuracy: the latter is chosen."""
    cells = {("none", "0"): (0.80, 0.81), ("none", "0.1"): (0.82, 0.90), ("cutmix", "0"): (0.84, 0.84)}
    cells[("cutmix", "0.1")] = (0.95, 0.85)  # test, val
    number = 0
    for (aug, smoothing), (acc, val) in cells.items():
        for seed, delta in ((0, -0.01), (1, 0.01)):
            fake_job(
                tmp_path, number, [f"aug={aug}", f"smoothing={smoothing}", f"seed={seed}"], acc + delta, val=val - delta
            )
            number += 1
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)

    rows = {(row["aug"], row["smoothing"]): row for row in report_rows(tmp_path)}
    assert [key for key, row in rows.items() if row["best_by_val"] == "True"] == [("none", "0.1")]
    assert {key: float(row["val_acc_mean"]) for key, row in rows.items()} == pytest.approx(
        {k: v for k, (_, v) in cells.items()}
    )
    assert float(rows[("cutmix", "0.1")]["test_acc_mean"]) == pytest.approx(0.95)  # the best test: not selected
    assert list(rows[("none", "0")])[5:9] == ["val_acc_mean", "val_acc_std", "best_by_val", "test_acc_mean"]
    text = report.markdown.read_text()
    best = "**Best cell by validation accuracy** ★: model=vit, aug=none, smoothing=0.1 — val acc 90.00 ± 1.41 (n=2)"
    assert f"{best}, test acc 82.00 ± 1.41 (n=2)" in text
    assert table_row(text, "| vit | none | 0.1 |")[4:6] == ["**90.00 ± 1.41 (n=2)** ★", "82.00 ± 1.41 (n=2)"]
    assert table_row(text, "| vit | cutmix | 0.1 |")[4:6] == ["85.00 ± 1.41 (n=2)", "95.00 ± 1.41 (n=2)"]
    pivot = text[text.index("## vit: test accuracy (%), aug × smoothing") :].splitlines()
    assert pivot[4:6] == ["| none | 80.00 ± 1.41 (n=2) | 82.00 ± 1.41 (n=2) ★ |",
                          "| cutmix | 84.00 ± 1.41 (n=2) | 95.00 ± 1.41 (n=2) |"]  # fmt: skip
    [ax, _colourbar] = heatmap(report.cells, "aug", "smoothing", ["model"]).axes
    [outline] = ax.patches  # around row none (0), column ε=0.1 (1)
    assert (outline.get_xy(), outline.get_edgecolor()[:3]) == ((0.5, -0.5), (1.0, 0.0, 0.0))


@pytest.mark.usefixtures("no_plots")
def test_runs_csv_has_a_row_per_job_in_every_state(tmp_path: Path) -> None:
    hydra = OmegaConf.create(grid_config({"aug": "none,cutmix"}, ["seed=0,1,2"]))
    fake_job(tmp_path, 0, ["aug=none", "seed=0"], 0.8, val=0.75)
    fake_job(tmp_path, 1, ["aug=none", "seed=1"], error="DataError: no images")
    fake_job(tmp_path, 2, ["aug=none", "seed=2"])  # running: metrics of one epoch, its lock held
    fake_job(tmp_path, 3, ["aug=cutmix", "seed=0"])  # stopped: last.pt holds the progress of two epochs
    (tmp_path / "3" / "last.pt").write_bytes(b"")
    for number, accuracies in ((1, [0.3]), (2, [0.4]), (3, [0.5, 0.6])):
        rows = [{"epoch": epoch, "val/acc": acc} for epoch, acc in enumerate(accuracies, start=1)]
        (tmp_path / str(number) / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with FileLock(str(tmp_path / "2" / ".run.lock")):
        write_report(tmp_path, sweep_jobs(tmp_path, expected_jobs(hydra, tmp_path)), DEFAULTS)

    rows = runs_rows(tmp_path)
    assert list(rows[0])[:7] == ["job", "run_dir", "model", "aug", "smoothing", "seed", "state"]
    shown = [
        (r["job"], r["aug"], r["seed"], r["state"], r["best_val_acc"], r["test_acc"], r["epochs_run"]) for r in rows
    ]
    assert shown == [
        ("0", "none", "0", "finished", "0.75", "0.8", "2"),
        ("1", "none", "1", "failed", "0.3", "", "1"),
        ("2", "none", "2", "running", "0.4", "", "1"),
        ("3", "cutmix", "0", "started", "0.6", "", "2"),
        ("4", "cutmix", "1", "not started", "", "", "0"),
        ("5", "cutmix", "2", "not started", "", "", "0"),
    ]
    assert rows[0]["run_dir"] == str(tmp_path / "0") and rows[5]["run_dir"] == str(tmp_path / "5")
    assert (rows[0]["wall_time_s"], rows[0]["train_img_per_s"], rows[0]["test_ece"]) == ("1.5", "2000.0", "0.05")
    assert rows[1]["wall_time_s"] == rows[1]["train_img_per_s"] == ""
    assert [row["aug"] for row in report_rows(tmp_path)] == ["none", "cutmix"]  # report.csv: a row per cell still


@pytest.mark.usefixtures("no_plots")
def test_images_per_second_and_the_jobs_that_shared_a_host(tmp_path: Path) -> None:
    """#0, #1 and #2 overlap in a chain on host a (at most two at once); #3 overlaps them in time on another host;
    #4 runs alone on a, after them; #5 recorded nothing."""
    windows = [("a", 0, 100), ("a", 50, 150), ("a", 140, 160), ("b", 0, 100), ("a", 200, 300), None]
    for number, window in enumerate(windows):
        fake_job(tmp_path, number, [f"optim.lr={number + 1}e-4"], 0.8)
        recorded = dict(zip(("host", "started_at", "finished_at"), window, strict=True)) if window else {}
        edit_results(tmp_path, number, train_img_per_s=1000.0 * (number + 1), **recorded)
    text = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS).markdown.read_text()

    rows = runs_rows(tmp_path)
    assert [row["overlapped_with"] for row in rows] == ["1", "0 2", "1", "none", "none", ""]
    assert [row["host"] for row in rows] == ["a", "a", "a", "b", "a", ""]
    assert rows[1]["started_at"] == "1970-01-01T00:00:50+00:00" and rows[1]["finished_at"].endswith("02:30+00:00")
    assert [float(row["train_img_per_s"]) for row in rows] == [1000.0 * n for n in range(1, 7)]
    assert [row["train_img_per_s"] for row in report_rows(tmp_path)] == [str(1000.0 * n) for n in range(1, 7)]
    assert "**Jobs that trained at the same time on one host**" in text and "a: #0, #1, #2 (up to 2 at once)" in text
    assert "1 of 6 finished jobs did not record where and when they trained" in text
    assert "| epoch time (s) | img/s | data wait | seeds |" in text
    speeds = [table_row(text, f"| 0.000{n} | 15,306 |")[-3] for n in range(1, 7)]  # 1e-4 ... 6e-4, img/s
    assert speeds == ["1,000†", "2,000†", "3,000†", "4,000", "5,000", "6,000"]
    assert table_row(text, "| 0.0001 | 15,306 |")[-4] == "0.5†"  # its epoch time, measured under contention too


@pytest.mark.usefixtures("no_plots")
def test_without_recorded_hosts_the_report_says_sharing_is_unknown(tmp_path: Path) -> None:
    fake_job(tmp_path, 0, ["aug=none"], 0.8)
    fake_job(tmp_path, 1, ["aug=cutmix"], 0.7)
    text = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS).markdown.read_text()
    assert "2 of 2 finished jobs did not record where and when they trained (results.json `host`" in text
    assert "†" not in text and [row["overlapped_with"] for row in runs_rows(tmp_path)] == ["", ""]
    edit_results(tmp_path, 0, host="a", started_at=0.0, finished_at=10.0)
    edit_results(tmp_path, 1, host="a", started_at=10.0, finished_at=20.0)  # one after the other: no overlap
    text = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS).markdown.read_text()
    assert "No two jobs trained at the same time on one host" in text and "did not record" not in text


def classic_sweep(sweep_dir: Path) -> None:
    """aug (cutmix, none, mixup: none is not first in job order) × ε (0, 0.1) × 2 seeds, with figures.json; the
    ECE of the two seeds of a cell differ by 0.02 and their last validation accuracies by 0.2."""
    number = 0
    for aug in ("cutmix", "none", "mixup"):
        for smoothing in ("0", "0.1"):
            for seed in (0, 1):
                acc = {"cutmix": 0.7, "none": 0.8, "mixup": 0.9}[aug] + float(smoothing) / 10
                fake_job(sweep_dir, number, [f"aug={aug}", f"smoothing={smoothing}", f"seed={seed}"], acc)
                edit_results(sweep_dir, number, test={"ece": 0.04 + 0.02 * seed})
                curve = [{"epoch": 1, "val/acc": 0.5}, {"epoch": 2, "val/acc": 0.6 + 0.2 * seed}]
                (sweep_dir / str(number) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
                drawn = {"bins": [{"confidence": 0.9, "accuracy": acc, "count": 10}]}
                (sweep_dir / str(number) / "figures.json").write_text(json.dumps({"reliability": drawn}))
                number += 1


def test_every_figure_is_labelled_and_saved_as_png_and_pdf(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    classic_sweep(tmp_path)
    caplog.set_level(logging.INFO)  # as Hydra sets the root logger
    report = write_report(tmp_path, sweep_jobs(tmp_path, None), DEFAULTS)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("fontTools")] == []  # its subsetting chatter

    names = ["accuracy_heatmap", "ece_vs_smoothing", "confidence_vs_smoothing", "reliability_by_smoothing"]
    assert [path.name for path in report.plots] == [f"{name}.png" for name in [*names, "val_curves"]]
    for png in report.plots:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    layout, cells = collect(sweep_jobs(tmp_path, None), DEFAULTS)
    for name, figure in figures(layout, cells).items():
        for ax in (ax for ax in figure.axes if ax.axison):
            if ax.get_label() == "<colorbar>":
                assert ax.get_ylabel() == "test accuracy (%)", name
            else:
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), (name, ax.get_title())


def test_seed_spreads_are_drawn_and_none_comes_first(tmp_path: Path) -> None:
    classic_sweep(tmp_path)
    drawn = figures(*collect(sweep_jobs(tmp_path, None), DEFAULTS))

    curves = [ax for ax in drawn["val_curves"].axes if ax.axison]  # small multiples: a panel per aug
    assert [ax.get_title() for ax in curves] == ["none", "cutmix", "mixup"]
    for ax in curves:
        assert [line.get_label() for line in ax.lines] == ["ε=0", "ε=0.1"]
        assert [line.get_color() for line in ax.lines] == ["C0", "C1"]  # the same ε, the same colour in every panel
        assert list(ax.lines[0].get_ydata()) == pytest.approx([50.0, 70.0])  # mean of 60% and 80% at epoch 2
        [band, _] = ax.collections  # mean ± std: 70 ± 14.14 at epoch 2, no spread at epoch 1
        ys = band.get_paths()[0].vertices[:, 1]
        assert (ys.min(), ys.max()) == pytest.approx((50.0, 70 + 100 * 0.2 / 2**0.5))

    [ece] = drawn["ece_vs_smoothing"].axes
    assert [text.get_text() for text in ece.get_legend().get_texts()] == ["none", "cutmix", "mixup"]
    for container in ece.containers:  # an error bar per point: ± the std of 0.04 and 0.06
        assert container.has_yerr
        for (_, low), (_, high) in container.lines[2][0].get_segments():
            assert (low, high) == pytest.approx((0.05 - 0.02 / 2**0.5, 0.05 + 0.02 / 2**0.5))

    heat = drawn["accuracy_heatmap"].axes[0]
    assert [label.get_text() for label in heat.get_yticklabels()] == ["none", "cutmix", "mixup"]
    colours = {text.get_text(): text.get_color() for text in heat.texts}
    assert colours["91.0"] == "black" and colours["70.0"] == "white"  # yellow and dark purple in viridis
    assert text_colour((1.0, 1.0, 0.0, 1.0)) == "black" and text_colour((0.1, 0.0, 0.3, 1.0)) == "white"
