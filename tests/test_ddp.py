"""One run on several processes (DDP): real torchrun, real gloo ranks on the CPU, compared with one process.

The global batch is split into equal slices of the same seeded epoch order, so two ranks train the weights
one process trains up to float rounding (the all-reduce sums the slices' gradients in another order):
`WEIGHTS_ATOL` is that tolerance; these runs differ by at most about 4e-7 after 80 AdamW steps. One part of
the ViT is left out: the attention's key bias, whose gradient is zero in exact arithmetic (softmax ignores a
shift shared by all keys), so Adam turns its rounding noise into steps of their own (up to 7e-5 apart here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from tests.conftest import REPO, TINY
from tests.sweeps import job_results, logged_epochs, report_rows, wait_for_epochs
from tests.test_slurm import slurm_sweep
from vitexp import checkpoint, run
from vitexp.config import ConfigError
from vitexp.distributed import ProcessGroup, rank_seed
from vitexp.feed import EpochOrder, local_batch_size
from vitexp.run import RunIdentity
from vitexp.rundir import LOCK_FILE, RunConflictError

# No random crop, flip or augmentation: the only difference between 1 and 2 processes is how the batch is split.
# Two micro-batches per step exercise DDP's no_sync, and clipping (on by default) the all-reduced gradients.
BASE = [
    *TINY,
    "data=digits",
    "data.crop=squash",
    "aug=none",
    "trainer.epochs=4",
    "data.batch_size=32",
    "trainer.accumulate=2",
    "sched.warmup_epochs=1",
]
WEIGHTS_ATOL = 1e-6
METRICS_ATOL = 1e-5
MARK = "VITEXP_DDP_TEST"  # names the processes of one torchrun, to find a rank's process by its environment


def torchrun(
    run_dir: Path, *overrides: str, wait: bool = True, base: list[str] = BASE
) -> subprocess.CompletedProcess[str] | subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 train.py BASE OVERRIDES hydra.run.dir=RUN_DIR`, one thread a rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "train.py"), *base, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARK: str(run_dir)}
    if wait:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(run_dir: Path, rank: int) -> int:
    """The process of `rank` in the torchrun that trains in `run_dir`."""
    wanted = {f"{MARK}={run_dir}".encode(), f"RANK={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if wanted <= environ:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights, each attention's key bias left out (see the module's docstring)."""
    model = checkpoint.load(run_dir / "last.pt")["model"]
    for name in [name for name in model if name.endswith("attn.qkv.bias")]:
        query, _, value = model[name].chunk(3)
        model[name] = torch.cat([query, value])
    return model


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of BASE on two gloo ranks."""
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    done = torchrun(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_ranks_train_the_weights_and_metrics_of_one_process_and_only_rank_0_writes(
    two_ranks: Path, make_cfg, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    results = run.run(make_cfg(*BASE), one, RunIdentity({}))
    assert max_difference(weights(two_ranks), weights(one)) < WEIGHTS_ATOL
    for mine, theirs in zip(rows(two_ranks), rows(one), strict=True):  # every epoch's validation, and training
        for key in [k for k in theirs if k.startswith(("val/", "train/"))]:
            assert mine[key] == pytest.approx(theirs[key], abs=METRICS_ATOL), key
    two_results = json.loads((two_ranks / "results.json").read_text())
    assert two_results["test"] == pytest.approx(results["test"], abs=METRICS_ATOL)
    assert two_results["best_epoch"] == results["best_epoch"]
    # rank 0 wrote exactly the files one process writes, and logged once; rank 1 wrote nothing
    assert sorted(p.name for p in two_ranks.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two_ranks / "train.log").read_text().count("model vit:") == 1
    assert len(checkpoint.load(two_ranks / "last.pt")["ranks"]) == 2  # each rank's own random draws


def test_a_signal_to_one_rank_stops_every_rank_and_the_run_resumes_on_two_or_one(
    two_ranks: Path, make_cfg, tmp_path: Path
) -> None:
    stopped = tmp_path / "stopped"
    process = torchrun(stopped, wait=False)
    wait_for_epochs(stopped / "metrics.jsonl", 1)
    os.kill(rank_pid(stopped, 1), signal.SIGUSR2)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports its workers' EXIT_STOPPED as a failure
    assert "received SIGUSR2" in stdout + stderr  # rank 1 heard it; rank 0 stopped at the same step and saved
    assert f"stopped by SIGUSR2; {stopped / 'last.pt'} holds the progress. Resume with:" in stderr
    assert "torchrun --nproc_per_node=2" in stderr and f"hydra.run.dir={stopped}" in stderr
    progress = checkpoint.load(stopped / "last.pt")["progress"]
    assert 1 <= progress["epoch"] < 4 and not (stopped / "results.json").exists()

    on_two, on_one = tmp_path / "on_two", tmp_path / "on_one"
    shutil.copytree(stopped, on_two)
    shutil.copytree(stopped, on_one)
    resumed = torchrun(on_two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (on_two / "train.log").read_text()
    assert max_difference(weights(on_two), weights(two_ranks)) == 0.0  # the same run, exactly
    assert logged_epochs(on_two / "metrics.jsonl") == [1, 2, 3, 4]

    run.run(make_cfg(*BASE), on_one, RunIdentity({}))  # the global batch is the same: only the rounding differs
    assert max_difference(weights(on_one), weights(two_ranks)) < WEIGHTS_ATOL
    assert logged_epochs(on_one / "metrics.jsonl") == [1, 2, 3, 4]


def test_random_draws_resume_on_each_rank_exactly(tmp_path: Path) -> None:
    """CutMix and dropout draw differently on each rank; a run stopped mid-epoch and resumed on two ranks draws on
    from each rank's saved generators, so it trains exactly the weights of the uninterrupted run."""
    drawn = [*BASE, "aug=cutmix", "model.dropout=0.1", "trainer.epochs=3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    process = torchrun(stopped, wait=False, base=drawn)
    wait_for_epochs(stopped / "metrics.jsonl", 1)
    os.kill(rank_pid(stopped, 1), signal.SIGUSR2)
    process.communicate(timeout=300)
    assert torchrun(whole, base=drawn).returncode == 0
    assert checkpoint.load(stopped / "last.pt")["progress"]["epoch"] < 3
    resumed = torchrun(stopped, base=drawn)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(weights(stopped), weights(whole)) == 0.0


COLLECTIVES = """
import sys, torch
from torch import nn
from vitexp.distributed import ProcessGroup

group = ProcessGroup.from_env()
rank = group.rank
with group.started(torch.device("cpu")):
    norm = nn.BatchNorm1d(2)
    norm.running_mean.fill_(rank + 1)
    group.share_buffers(norm)
    answers = {
        "finite": group.all_true(torch.tensor(rank == 0)).item(),  # a NaN on rank 1 skips the step on rank 0 too
        "stop": group.max([0, 12 if rank == 1 else 0]),  # USR2 on rank 1 only
        "sums": group.sum(torch.tensor([1.0, rank])).tolist(),
        "from_main": group.from_main(f"rank {rank}'s"),
        "gathered": group.gather({"rank": rank}),
        "buffers": norm.running_mean.tolist(),
    }
    group.barrier()
torch.save(answers, f"{sys.argv[1]}/{rank}.pt")
"""


def test_the_ranks_agree_through_real_gloo_collectives(tmp_path: Path) -> None:
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run([*command, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt") == {
            "finite": False,
            "stop": [0, 12],
            "sums": [2.0, 1.0],
            "from_main": "rank 0's",
            "gathered": [{"rank": 0}, {"rank": 1}],
            "buffers": [1.0, 1.0],
        }


class ScriptedGroup(ProcessGroup):
    """Rank `rank` of two, without the other: its broadcasts are recorded, and `answers` are what rank 0 sends."""

    def __init__(self, rank: int, answers: list[Any]) -> None:
        super().__init__(rank, 2)
        self.answers, self.sent = answers, []

    @contextmanager
    def started(self, device: torch.device) -> Iterator[ProcessGroup]:
        yield self

    def from_main(self, value: Any) -> Any:
        self.sent.append(value)
        return self.answers.pop(0) if self.answers else value


def test_rank_0_sends_its_refusal_and_the_other_ranks_raise_it_without_touching_the_directory(
    two_ranks: Path, make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's decision travels from rank 0 before anything trains (torchrun: every rank exits 2 with rank 0's
    error instead of waiting for it); the other ranks never take the directory's lock."""
    finished = tmp_path / "finished"
    shutil.copytree(two_ranks, finished)
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    main = ScriptedGroup(0, [])
    monkeypatch.setattr(run.ProcessGroup, "from_env", classmethod(lambda cls: main))
    with pytest.raises(RunConflictError, match="already holds a finished run of a different config") as refusal:
        run.run(make_cfg(*BASE, "smoothing=0.2"), finished, RunIdentity({}))
    assert main.sent[0] == finished and main.sent[1] == ("error", refusal.value)

    other = ScriptedGroup(1, [finished, ("error", refusal.value)])
    monkeypatch.setattr(run.ProcessGroup, "from_env", classmethod(lambda cls: other))
    with FileLock(str(finished / LOCK_FILE), timeout=0), pytest.raises(RunConflictError) as heard:
        run.run(make_cfg(*BASE, "smoothing=0.2"), tmp_path / "its own clock", RunIdentity({}))
    assert heard.value is refusal.value and not (tmp_path / "its own clock").exists()
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_what_the_ranks_cannot_run_is_refused_before_the_directory_is_touched(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert local_batch_size(128, 2) == 64
    with pytest.raises(ConfigError, match=r"data.batch_size=100 is the global batch .* among the 3 processes"):
        local_batch_size(100, 3)
    monkeypatch.setattr(run.ProcessGroup, "from_env", classmethod(lambda cls: ScriptedGroup(0, [])))
    with pytest.raises(ConfigError, match=r"data.batch_size=33 .* \(world size 2\): use a multiple of 2"):
        run.run(make_cfg(*BASE, "data.batch_size=33"), tmp_path / "run", RunIdentity({}))
    with pytest.raises(ConfigError, match="trainer.sync_bn=true needs CUDA"):
        run.run(make_cfg(*BASE, "trainer.sync_bn=true"), tmp_path / "run", RunIdentity({}))
    assert not (tmp_path / "run").exists()


def test_the_ranks_slices_are_the_global_batches_of_one_process() -> None:
    one = EpochOrder(50, 8, 6, seed=3)
    slices = [EpochOrder(50, 8, 6, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for order in (one, *slices):
        order.set_position(epoch=2, start_batch=1)
    by_batch = torch.cat([s.indices().view(-1, 4) for s in slices], dim=1).reshape(-1)
    assert torch.equal(by_batch, one.indices()) and len(slices[1]) == 20


def test_a_lone_process_is_a_group_of_one_with_the_runs_own_seed() -> None:
    assert ProcessGroup.from_env({}) == ProcessGroup()
    assert not ProcessGroup.from_env({"WORLD_SIZE": "1", "RANK": "0"}).active
    group = ProcessGroup.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (group.rank, group.world_size, group.local_rank, group.is_main) == (3, 4, 1, False)
    assert group.device(torch.device("cpu")) == torch.device("cpu")
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, rank, step) for rank in (1, 2) for step in (0, 5)}) == 4


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_slurm_job_of_two_tasks_is_one_run_on_two_ranks(tmp_path: Path) -> None:
    """submitit starts both tasks and knows the rendezvous: one run directory, written by rank 0, one job."""
    sweep_dir = tmp_path / "sweep"
    result = slurm_sweep(sweep_dir, "hydra.launcher.tasks_per_node=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(job_results(sweep_dir)) == [0] and sorted(p.name for p in sweep_dir.glob("[0-9]*")) == ["0"]
    assert len(checkpoint.load(sweep_dir / "0" / "last.pt")["ranks"]) == 2  # both tasks trained it
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # one result per task
    assert (sweep_dir / "0" / "train.log").read_text().count("model vit:") == 1
    assert [row["status"] for row in report_rows(sweep_dir)] == ["1/1"]
