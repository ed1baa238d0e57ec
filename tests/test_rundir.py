"""The run directory: refusals leave it as it was, resumes are checked up front, its files stay honest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import CONF, TINY, run_train
from vitexp import checkpoint, run
from vitexp.checkpoint import CheckpointError
from vitexp.engine import Trainer
from vitexp.logger import MetricsFileError, read_jsonl
from vitexp.run import RunIdentity

BASE = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "aug=cutmix", "smoothing=0.1"]
IDENTITY = RunIdentity({"model": "vit", "aug": "cutmix", "data": "digits"})


def fit(make_cfg, run_dir: Path, *overrides: str) -> dict:
    return run.run(make_cfg(*BASE, *overrides), run_dir, IDENTITY)


def die_after_saving(monkeypatch, epoch: int) -> None:
    """Make the run die (as if killed) right after `last.pt` of `epoch` is written."""
    original = Trainer.save_last

    def save_then_die(self: Trainer) -> None:
        original(self)
        if self.progress.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_last", save_then_die)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_refused_run_leaves_its_directory_byte_identical(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tiny = [*BASE, "trainer.epochs=1", "logger=none", f"hydra.run.dir={run_dir}"]
    assert run_train(*tiny).returncode == 0
    finished = snapshot(run_dir)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "last.pt", "results.json"} <= set(finished)

    other = run_train(*tiny, "smoothing=0.2")  # a finished run of another config
    assert other.returncode == 2
    assert f"{run_dir} already holds a finished run of a different config (smoothing: 0.1 -> 0.2)" in other.stderr
    assert snapshot(run_dir) == finished

    (run_dir / "results.json").unlink()  # now a run to resume, of another config
    unfinished = snapshot(run_dir)
    other = run_train(*tiny, "smoothing=0.2")
    assert other.returncode == 2 and "last.pt was made with a different config (smoothing: 0.1 -> 0.2)" in other.stderr
    assert snapshot(run_dir) == unfinished

    with FileLock(str(run_dir / ".run.lock")):  # a running job holds the directory
        busy = run_train(*tiny)
    assert busy.returncode == 2 and "is in use by another running job" in busy.stderr
    assert snapshot(run_dir) == unfinished


def test_best_checkpoint_is_checked_when_a_run_resumes_and_the_advice_works(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    die_after_saving(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, run_dir)
    monkeypatch.undo()
    last_written = (run_dir / "last.pt").stat().st_mtime_ns

    good_best = (run_dir / "best.pt").read_bytes()
    (run_dir / "best.pt").write_bytes(good_best[:1000])  # torn by a bad disk
    with pytest.raises(CheckpointError, match=r"best.pt is unreadable .*the test needs it: move last.pt, best.pt and"):
        fit(make_cfg, run_dir)
    (run_dir / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"best.pt is missing, but .*last.pt records epoch 1 as the best"):
        fit(make_cfg, run_dir)
    assert (run_dir / "last.pt").stat().st_mtime_ns == last_written  # refused before any training
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    (run_dir / "best.pt").write_bytes(good_best)  # "restore it": the run resumes
    assert fit(make_cfg, run_dir)["best_epoch"] in (1, 2)

    second = tmp_path / "second"
    die_after_saving(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, second)
    monkeypatch.undo()
    (second / "best.pt").unlink()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("last.pt", "best.pt", "wandb_id"):  # "move last.pt, best.pt and wandb_id out": from scratch
        if (second / name).exists():
            shutil.move(second / name, moved / name)
    results = fit(make_cfg, second)
    assert [row["epoch"] for row in read_jsonl(second / "metrics.jsonl")] == [1, 2]
    assert results["test"] == json.loads((run_dir / "results.json").read_text())["test"]  # the same run, redone


def test_a_best_checkpoint_newer_than_last_is_kept(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """A kill between writing best.pt and last.pt of an epoch: best.pt is from the lost epoch."""
    straight = fit(make_cfg, tmp_path / "straight")
    run_dir = tmp_path / "run"
    die_after_saving(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, run_dir)
    monkeypatch.undo()
    epoch_1 = (run_dir / "last.pt").read_bytes()
    fit(make_cfg, run_dir)
    (run_dir / "results.json").unlink()
    (run_dir / "last.pt").write_bytes(epoch_1)  # best.pt is now epoch 2's, last.pt epoch 1's
    assert checkpoint.load(run_dir / "best.pt")["epoch"] == straight["best_epoch"] == 2
    assert fit(make_cfg, run_dir)["test"] == straight["test"]


def test_metrics_stay_one_row_per_epoch_after_a_kill_before_the_first_checkpoint(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    def die_before_saving(self: Trainer) -> None:
        raise KeyboardInterrupt  # epoch 1's row is written, its checkpoint is not

    monkeypatch.setattr(Trainer, "save_last", die_before_saving)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, tmp_path / "run")
    assert [row["epoch"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    monkeypatch.undo()
    fit(make_cfg, tmp_path / "run")
    assert [row["epoch"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_cut_short_last_metrics_line_is_dropped_with_a_warning(make_cfg, tmp_path: Path, monkeypatch, caplog) -> None:
    run_dir = tmp_path / "run"
    die_after_saving(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, run_dir)
    monkeypatch.undo()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "train/lo')  # killed while writing epoch 2's row
    fit(make_cfg, run_dir)
    assert [row["epoch"] for row in read_jsonl(metrics)] == [1, 2]
    assert f"{metrics}: dropping its last line, cut short by an interrupted write" in caplog.text

    metrics.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl line 2 is not JSON"):
        read_jsonl(metrics)


def test_results_cover_the_whole_run_after_a_resume(make_cfg, tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    original_step = Trainer.optimizer_step

    def stop_after_12_steps(self: Trainer, finite) -> None:
        original_step(self, finite)
        if self.progress.step == 12:
            time.sleep(1.0)  # this invocation takes clearly longer than the resumed one
            self.stop_requested = True

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_12_steps)
    assert fit(make_cfg, run_dir) == {}
    monkeypatch.undo()
    first = checkpoint.load(run_dir / "last.pt")["progress"]
    assert first["wall_seconds"] > 1.0 and first["train_images"] == 12 * 128
    results = fit(make_cfg, run_dir)
    progress = checkpoint.load(run_dir / "last.pt")["progress"]
    assert progress["train_images"] == 20 * 128  # 2 epochs of 10 steps, over both invocations
    assert results["train_img_per_s"] == pytest.approx(progress["train_images"] / progress["train_seconds"])
    assert progress["train_seconds"] > first["train_seconds"] > 1.0
    assert results["wall_time_s"] > first["wall_seconds"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[1]["epoch_time_s"] > 1.0  # epoch 2 was split across the invocations; its time is whole


def test_the_sweeper_objective_is_the_best_validation_accuracy(tmp_path: Path) -> None:
    """What `train.py`'s task returns is what Optuna & co. maximise: never a test metric."""
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[*BASE, "logger=none"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    task_cfg = cfg.copy()
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    objective = run.main(task_cfg)
    results = json.loads((run_dir / "results.json").read_text())
    assert objective == results["best_val"]["acc"] == max(r["val/acc"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    assert objective != results["test"]["acc"]  # the two differ here, so returning the test accuracy would fail


def test_keep_last_false_deletes_last_pt_only_once_the_run_has_finished(make_cfg, tmp_path: Path, stop_once_at) -> None:
    overrides = [*TINY, "data=digits", "data.batch_size=128", "trainer.epochs=2", "trainer.keep_last=false"]
    stop_once_at(3)
    assert run.run(make_cfg(*overrides), tmp_path / "run", RunIdentity({})) == {}
    assert (tmp_path / "run" / "last.pt").exists()  # stopped: the checkpoint it resumes from stays
    results = run.run(make_cfg(*overrides), tmp_path / "run", RunIdentity({}))
    assert not (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    again = run.run(make_cfg(*overrides[:-1]), tmp_path / "run", RunIdentity({}))  # keep_last changes no experiment
    assert again == results  # finished: not trained again, and nothing is missing for it


def test_save_best_false_deletes_best_pt_once_the_run_is_tested(make_cfg, tmp_path: Path) -> None:
    overrides = [*TINY, "data=digits", "data.batch_size=128", "trainer.epochs=1"]
    results = run.run(
        make_cfg(*overrides, "trainer.save_best=false", "trainer.keep_last=false"), tmp_path / "run", RunIdentity({})
    )
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
    assert results["test"]["acc"] > 0.1  # tested on best.pt before it was deleted
    again = run.run(make_cfg(*overrides), tmp_path / "run", RunIdentity({}))  # save_best changes no experiment
    assert again == results  # finished: its results are all a relaunch needs
