"""sbatch's refusals of a sweep's jobs end the sweep before anything is submitted, with one line naming the key.

The cluster tests run on the local cluster (tests/slurm/cluster.sh: one node, no GPUs, no time limit, no
accounting, partition limits enforced at submission); the others put a stand-in `sbatch` first on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_train
from tests.sweeps import SWEEP
from vitexp.launcher import SlurmLauncher, refusal_text, refused_keys, sbatch_answer, sbatch_script

FITS = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=60"]
cluster = pytest.mark.usefixtures("slurm_cluster")


def slurm_sweep(sweep_dir: Path, *overrides: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The tiny digits sweep on the cluster, with `path` first on PATH."""
    env = {"PATH": f"{path}:{os.environ['PATH']}"} if path else None
    return run_train(
        "-m", *SWEEP, "hydra/launcher=slurm", *overrides, f"hydra.sweep.dir={sweep_dir}", env=env, timeout=300
    )


def jobs_of(sweep_dir: Path) -> list[str]:
    """The jobs slurmctld knows (squeue lists ended ones for MinJobAge) that were submitted from `sweep_dir`."""
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %o"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if str(sweep_dir) in line]


def assert_refused(result: subprocess.CompletedProcess[str], sweep_dir: Path, quote: str, key: str) -> str:
    """One `error:` line that quotes sbatch and names `key`, exit 2, no traceback, and nothing submitted."""
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: nothing was launched: sbatch refuses the jobs (") and quote in line, line
    assert f"hydra.launcher.{key}" in line, line
    assert "Traceback" not in result.stderr + result.stdout
    assert not (sweep_dir / ".submitit").exists()
    assert not [path for path in sweep_dir.iterdir() if path.is_dir()]  # no job folder
    assert jobs_of(sweep_dir) == []
    return line


@pytest.mark.slurm
@cluster
@pytest.mark.parametrize("fits", [FITS, []], ids=["else-fitting", "all-defaults"])
def test_gpus_on_a_partition_without_gpus_are_refused_before_submission(tmp_path: Path, fits: list[str]) -> None:
    """The default asks 1 GPU per job; all defaults also ask 8 CPUs and 32 GB, more than the node has."""
    result = slurm_sweep(tmp_path / "sweep", *fits, "aug=none,cutmix")
    assert_refused(result, tmp_path / "sweep", '"Invalid generic resource (gres) specification"', "gpus_per_node=0")


@pytest.mark.slurm
@cluster
def test_unknown_partition_is_refused(tmp_path: Path) -> None:
    result = slurm_sweep(tmp_path / "sweep", *FITS, "hydra.launcher.gpus_per_node=0", "hydra.launcher.partition=nope")
    assert_refused(result, tmp_path / "sweep", "invalid partition specified: nope", "partition (now nope)")


@pytest.fixture
def short_partition() -> Iterator[str]:
    """A partition of the cluster's node with a 10-minute limit, for one test: the cluster's own has no limit."""
    name = f"vitexp_short_{os.getpid()}"
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True).stdout.split()[0]
    created = subprocess.run(
        ["scontrol", "create", f"PartitionName={name}", f"Nodes={node}", "MaxTime=10", "State=UP"],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        pytest.skip(f"cannot create a partition with a time limit: {created.stderr.strip()}")
    yield name
    subprocess.run(["scontrol", "delete", f"PartitionName={name}"], check=True)


@pytest.mark.slurm
@cluster
def test_time_limit_over_the_partitions_is_refused(tmp_path: Path, short_partition: str) -> None:
    result = slurm_sweep(
        tmp_path / "sweep", *FITS, "hydra.launcher.gpus_per_node=0", f"hydra.launcher.partition={short_partition}"
    )
    line = assert_refused(result, tmp_path / "sweep", "Requested time limit is invalid", "timeout_min (now 60)")
    assert "hydra.launcher.partition" not in line  # another partition would take it, but sbatch names the time


@pytest.mark.slurm
@cluster
def test_memory_over_the_nodes_is_refused(tmp_path: Path) -> None:
    node_mb = subprocess.run(["sinfo", "-h", "-o", "%m"], capture_output=True, text=True, check=True).stdout
    mem_gb = max(int(mb.rstrip("+")) for mb in node_mb.split()) // 1024 + 1
    result = slurm_sweep(tmp_path / "sweep", *FITS, "hydra.launcher.gpus_per_node=0", f"hydra.launcher.mem_gb={mem_gb}")
    assert_refused(
        result, tmp_path / "sweep", "Requested node configuration is not available", f"mem_gb (now {mem_gb})"
    )


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of stand-in commands, each running its bash script (`sbatch="exit 1"`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


UNREACHABLE = (
    "echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2"
)


@pytest.mark.parametrize(
    ("sbatch", "accepted", "said"),
    [
        ("echo 'sbatch: Job 7 to start at 2026-01-01T00:00:00' >&2", True, "Job 7 to start at 2026-01-01T00:00:00"),
        (f"{UNREACHABLE}; exit 1", None, "Batch job submission failed: Unable to contact slurm controller"),
        ("exit 1", None, "sbatch exited with status 1 and said nothing"),
        ("kill -9 $$", None, "sbatch exited with status -9 and said nothing"),
        (None, None, "No such file or directory"),
        ("echo 'allocation failure: Invalid qos specification' >&2; exit 1", False, "Invalid qos specification"),
    ],
    ids=["accepted", "controller-down", "silent", "killed", "missing", "refused"],
)
def test_only_a_real_refusal_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sbatch: str | None, accepted: bool | None, said: str
) -> None:
    """A check that cannot get an answer (no sbatch, slurmctld down) lets the jobs be submitted unchecked."""
    monkeypatch.setenv("PATH", str(fake_bin(tmp_path, **({"sbatch": sbatch} if sbatch else {}))))
    answer = sbatch_answer("#!/bin/bash\nsrun true\n")
    assert answer.accepted is accepted and said in answer.said, answer


def test_refusal_names_the_key_that_sbatch_takes_the_jobs_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account the cluster does not know (the local cluster keeps no accounts, so a stand-in sbatch refuses it)."""
    import submitit

    sbatch = (
        "grep -q -- '--account=' || exit 0\n"
        "echo 'allocation failure: Invalid account or account/partition combination specified' >&2; exit 1"
    )
    bin_dir = fake_bin(tmp_path, sbatch=sbatch, srun="exit 0")  # submitit wants an srun
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = submitit.SlurmExecutor(tmp_path / "%j")
    slurm.update_parameters(account="nope", partition="cpu", gpus_per_node=0, cpus_per_task=1, mem="2GB", time=60)
    answer = sbatch_answer(sbatch_script(slurm, 4))
    assert answer == (False, "Invalid account or account/partition combination specified")
    # without the partition it is still refused: only the account is to change, though the message names both
    assert refused_keys(slurm, 4, answer.said) == ["account"]
    text = refusal_text(answer.said, ["account"], {"account": "nope"})
    assert text.startswith('sbatch refuses the jobs ("Invalid account or account/partition combination specified"): ')
    assert "set hydra.launcher.account (now nope) to one of yours" in text


@pytest.mark.parametrize("count", [1, 3], ids=["one-job", "array"])
def test_checked_script_is_the_one_submitit_submits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """sbatch is asked about the very script submitit then submits: a submitit upgrade that changes it fails here."""
    import submitit

    sbatch = f'cp "$1" {tmp_path}/submitted.sh; echo "Submitted batch job 12"'
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, sbatch=sbatch, srun='exit 0')}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(gpus_per_node=1, mem_gb=32, timeout_min=240, slurm_partition="gpu", slurm_account="me")
    executor.map_array(print, range(count))
    assert (tmp_path / "submitted.sh").read_text() == sbatch_script(executor._executor, count)


@pytest.mark.slurm
@cluster
def test_sweep_is_submitted_when_sbatch_cannot_be_asked(tmp_path: Path) -> None:
    """Only a refusal stops the sweep: with slurmctld unreachable for the check, the jobs are submitted unchecked."""
    real = shutil.which("sbatch")
    bin_dir = fake_bin(tmp_path, sbatch=f'if [ "$1" = --test-only ]; then {UNREACHABLE}; exit 1; fi\nexec {real} "$@"')
    result = slurm_sweep(tmp_path / "sweep", *FITS, "hydra.launcher.gpus_per_node=0", "trainer.epochs=1", path=bin_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not ask sbatch whether it takes these jobs (Batch job submission failed: Unable to contact" in (
        result.stdout + result.stderr
    )
    assert len(jobs_of(tmp_path / "sweep")) == 1 and (tmp_path / "sweep" / "0" / "results.json").exists()


def test_the_check_can_be_turned_off_for_drained_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch --test-only counts only nodes that are up: VITEXP_SBATCH_CHECK=0 submits what it would refuse."""
    import submitit

    refuse = "echo 'allocation failure: Requested node configuration is not available' >&2; exit 1"
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, sbatch=refuse, srun='exit 0')}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(tmp_path / "submitit" / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition="gpu")
    launcher = SlurmLauncher.__new__(SlurmLauncher)  # only its check, not a Hydra launch
    launcher.params = {"partition": "gpu"}
    with pytest.raises(SystemExit) as exited:
        launcher.check_submission(executor, 2)
    assert exited.value.code == 2
    monkeypatch.setenv("VITEXP_SBATCH_CHECK", "0")
    launcher.check_submission(executor, 2)  # returns: the jobs go to sbatch unchecked
