"""CPU threads: a run's CPU budget (trainer.threads, SLURM, the launcher) split between torch and DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY
from vitexp.config import ConfigError, semantic_config, validate
from vitexp.device import plan_threads
from vitexp.engine import Trainer


@pytest.mark.parametrize(
    "requested,launcher,environ,workers,expected",
    [
        (None, None, {}, 4, (None, 4, None, None)),  # a lone run: torch's default, workers as configured
        (None, 8, {}, 4, (8, 4, 4, 8)),  # the launcher's cpus_per_task
        (None, 8, {"SLURM_CPUS_PER_TASK": "2"}, 4, (2, 1, 1, 2)),  # SLURM's allocation wins over the launcher's
        (3, 8, {"SLURM_CPUS_PER_TASK": "2"}, 4, (3, 2, 1, 3)),  # an explicit trainer.threads wins over both
        (1, None, {}, 4, (1, 0, 1, 1)),  # one CPU: no workers, they would only compete with training
        (4, None, {}, 0, (4, 0, 4, 4)),
    ],
)
def test_the_budget_and_its_split(requested, launcher, environ, workers, expected) -> None:
    plan = plan_threads(requested, launcher, workers, environ)
    budget, planned_workers, with_loaders, resident = expected
    assert (plan.budget, plan.workers) == (budget, planned_workers)
    assert plan.training_threads(loaders=True) == with_loaders
    assert plan.training_threads(loaders=False) == resident  # data on the device: no workers run


def test_a_run_uses_its_budget_and_lowers_its_workers(make_cfg, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    overrides = [*TINY, "data=digits", "data.on_device=false", "data.num_workers=3", "trainer.threads=2"]
    cfg = make_cfg(*overrides)
    try:
        trainer = Trainer(validate(cfg), tmp_path, OmegaConf.to_container(cfg, resolve=True), {})
        assert torch.get_num_threads() == 1
        assert [trainer.feed.loaders[split].num_workers for split in ("train", "val", "test")] == [1, 1, 1]
        assert (
            trainer.threads.describe(loaders=True)
            == "CPU budget 2 (trainer.threads): 1 torch thread(s), 1 DataLoader worker(s)"
        )
    finally:
        torch.set_num_threads(before)


def test_threads_are_checked_and_do_not_change_the_experiment(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"trainer.threads=0 is not allowed: expected an integer >= 1, or null"):
        validate(make_cfg("trainer.threads=0"))
    one, four = (OmegaConf.to_container(make_cfg(f"trainer.threads={n}"), resolve=True) for n in (1, 4))
    assert semantic_config(one) == semantic_config(four)  # a relaunch with other threads resumes the same run
