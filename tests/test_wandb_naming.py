"""W&B run names and tags: a sweep's jobs are named by what varies across it, and tagged with what they ran."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from tests.sweeps import sweep
from tests.wandb_offline import offline_runs, read_offline_run
from vitexp.logger import RunIdentity
from vitexp.sweep import swept_keys
from vitexp.wandb_logger import VARYING_KEYS_FILE, run_name, run_tags, sweep_varying_keys

CHOICES = {"model": "vit", "aug": "cutmix", "data": "digits"}
JOB = ["+sweep=aug_smoothing", "data=digits", "trainer.epochs=2", "aug=cutmix", "smoothing=0.1", "logger=wandb"]


def test_a_sweep_job_is_named_by_its_varying_overrides_only() -> None:
    job = RunIdentity(CHOICES, JOB, "aug_smoothing", Path("multirun/2026-11-23/12-00-00"))
    assert run_name(job, {"aug", "smoothing"}) == "aug=cutmix,smoothing=0.1"
    assert run_name(job, None) == "data=digits,trainer.epochs=2,aug=cutmix,smoothing=0.1"  # not recorded: all
    assert run_name(job, set()) == run_name(job, None)  # a one-job sweep varies nothing: all, still unique
    assert run_name(RunIdentity(CHOICES, ["+seed=3"]), {"seed"}) == "+seed=3"
    assert run_name(RunIdentity(CHOICES), None) == "model=vit,aug=cutmix"  # no overrides at all
    assert run_name(RunIdentity({}, role="report"), {"aug"}) == "report"


def test_tags_put_the_shells_first_then_data_model_and_sweep_without_repeats() -> None:
    config = {"data": {"name": "digits"}, "model": {"name": "vit"}}
    job = RunIdentity({"model": "vit_tiny", "data": "digits"}, [], "[aug_smoothing,seeds]", Path("m/d/t"))
    assert run_tags(["digits", "mine"], config, job) == ["digits", "mine", "vit_tiny", "aug_smoothing+seeds"]
    assert run_tags([], config, RunIdentity({})) == ["digits", "vit"]  # a single run, choices unknown: the config's
    assert run_tags(["mine"], {}, RunIdentity({}, sweep_dir=Path("m/d/t"), role="report")) == ["mine", "sweep"]


def test_a_sampling_sweeper_varies_every_parameter_it_searches() -> None:
    hydra = OmegaConf.create(
        {
            "sweeper": {"params": {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "+aug": "choice(none,cutmix)"}},
            "overrides": {"task": ["smoothing=0.1"]},
        }
    )
    assert swept_keys(None, hydra) == ["aug", "optim.lr"]


def test_sweep_runs_are_named_by_the_varying_key_and_tagged_with_the_sweep(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "2026-11-23" / "12-00-00"
    result = sweep(
        sweep_dir,
        "+sweep=seeds",
        "hydra.sweeper.params.seed='0,1'",
        "trainer.epochs=1",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "logger.wandb.tags=[mine]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((sweep_dir / VARYING_KEYS_FILE).read_text()) == {"varying_keys": ["seed"]}
    assert sweep_varying_keys(sweep_dir) == {"seed"} and sweep_varying_keys(tmp_path) is None
    runs = [read_offline_run(offline_runs(sweep_dir / str(n))[0]) for n in range(2)]
    assert [run["name"] for run in runs] == ["seed=0", "seed=1"]  # not the overrides every job shares
    assert all(run["tags"] == ["mine", "digits", "vit", "seeds"] for run in runs)
    assert {run["group"] for run in runs} == {"seeds-2026-11-23-12-00-00"}
    [report] = [read_offline_run(folder) for folder in offline_runs(sweep_dir)]
    assert (report["name"], report["tags"]) == ("report", ["mine", "seeds"])
