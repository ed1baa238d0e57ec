"""Submitit launchers that never wait forever: a job that dies without a result is reported, not awaited.

hydra-submitit-launcher waits with `job.results()`. A local job whose process is killed (the OOM killer,
`kill -9`) then raises UncompletedJobError out of the launcher: a traceback, no report. A SLURM job killed on a
cluster without accounting is never done for submitit (it asks sacct), so the launcher waits forever. These
launchers submit exactly as the plugin does, then wait themselves: a job is finished when its result pickle is
there, and lost when its process (local) or its allocation (SLURM: gone from squeue) is gone without one. A lost
job gets `failed.json` with the reason that can be known and a NaN result, so the sweep ends, `SweepCallback`
writes the report, lists the job and exits 1, and the same command resumes the job from its `last.pt`.

Before submitting, the SLURM launcher asks sbatch whether the cluster takes the jobs (`sbatch --test-only` on the
script submitit would submit). A refusal (no GPUs on the partition, an unknown partition or account, a time limit
or memory the partition does not have) ends the sweep with nothing submitted and one line that quotes sbatch and
names the `hydra.launcher` key to change, instead of submitit's FailedJobError traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict, read_write

from vitexp.cluster import available_cpus

if TYPE_CHECKING:
    from submitit import AutoExecutor, Job
    from submitit.slurm.slurm import SlurmExecutor

log = logging.getLogger(__name__)

POLL_S = 1.5
# a line of a job's log that says how it ended: srun's "task 0: Killed", slurmstepd's "oom-kill event", ...
END_LINE = re.compile(r"\boom|out of memory|\bkilled\b|\bcancell?ed\b|node.?fail|segmentation fault", re.I)
NOT_RUN = (124, 127)  # slurm_command's status for a client that timed out or could not be started
# sbatch's words for a question slurmctld did not answer (down, busy, munge failing): no verdict on the jobs
UNANSWERED = re.compile(
    r"unable to contact|timed out|zero bytes|communication|connection|authenticat|credential|temporar", re.I
)
SBATCH_PREFIX = re.compile(r"^(sbatch: error: |sbatch: |allocation failure: )")


class LauncherKey(NamedTuple):
    """A `hydra.launcher` key that can make sbatch refuse the jobs."""

    sbatch: str  # submitit's name of the sbatch parameter it sets
    words: re.Pattern[str]  # what sbatch says when it refuses that parameter
    advice: str  # how to fix it, `{value}` being the key's value


CHECK_ENV = "VITEXP_SBATCH_CHECK"  # 0: submit without asking sbatch --test-only first

# partition last: a partition other than the one asked for takes most requests that one refuses
LAUNCHER_KEYS = {
    "gpus_per_node": LauncherKey(
        "gpus_per_node",
        re.compile(r"gres|generic resource|gpu", re.I),
        "hydra.launcher.gpus_per_node={value} asks for GPUs: set hydra.launcher.gpus_per_node=0 where the partition"
        " has none, or choose one that has them with hydra.launcher.partition=NAME (`sinfo -o '%P %G'` lists them)",
    ),
    "timeout_min": LauncherKey(
        "time",
        re.compile(r"time limit|--time", re.I),
        "set hydra.launcher.timeout_min (now {value}) within the partition's time limit (`sinfo -o '%P %l'`)",
    ),
    "mem_gb": LauncherKey(
        "mem",
        re.compile(r"memory|\bmem\b", re.I),
        "set hydra.launcher.mem_gb (now {value}) to at most a node's memory (`sinfo -o '%P %m'`: MB per node)",
    ),
    "cpus_per_task": LauncherKey(
        "cpus_per_task",
        re.compile(r"processor|cpu", re.I),
        "set hydra.launcher.cpus_per_task (now {value}) to at most a node's CPUs (`sinfo -o '%P %c'`)",
    ),
    "tasks_per_node": LauncherKey(
        "ntasks_per_node", re.compile(r"task", re.I), "set hydra.launcher.tasks_per_node (now {value}) lower"
    ),
    "nodes": LauncherKey(
        "nodes",
        re.compile(r"node count", re.I),
        "set hydra.launcher.nodes (now {value}) to at most the partition's nodes (`sinfo -o '%P %D'`)",
    ),
    "constraint": LauncherKey(
        "constraint",
        re.compile(r"feature|constraint", re.I),
        "set hydra.launcher.constraint (now {value}) to features the nodes have (`sinfo -o '%P %f'`), or null",
    ),
    "qos": LauncherKey(
        "qos",
        re.compile(r"qos", re.I),
        "set hydra.launcher.qos (now {value}) to one your account may use"
        " (`sacctmgr -n show assoc user=$USER format=account,qos`), or null",
    ),
    "account": LauncherKey(
        "account",
        re.compile(r"account|association", re.I),
        "set hydra.launcher.account (now {value}) to one of yours"
        " (`sacctmgr -n show assoc user=$USER format=account`), or null for your default",
    ),
    "partition": LauncherKey(
        "partition",
        re.compile(r"partition", re.I),
        "set hydra.launcher.partition (now {value}) to one that `sinfo -s` lists, or null for the default",
    ),
}


class Answer(NamedTuple):
    """sbatch's answer to `--test-only`: `accepted` is None when sbatch could not be asked, `said` says why."""

    accepted: bool | None
    said: str


class WaitingLauncher(plugin.BaseSubmititLauncher):
    """The plugin's launch, with a wait that ends: `gone` and `lost_reason` say how a job ends without a result."""

    # how long a job must stay gone without a result before it is lost (a shared file system may show the
    # result pickle late)
    lost_after_s = 0.0
    submitted_at = 0.0  # when this launch submitted its jobs: a failed.json older than that is a previous launch's

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.submitted_at = time.time()
        jobs = self.submit_jobs(job_overrides, initial_job_idx)
        lost = self.wait_for_jobs(jobs, initial_job_idx)
        returns = []
        for num, (overrides, job) in enumerate(zip(job_overrides, jobs, strict=True), start=initial_job_idx):
            if job.job_id in lost:
                returns.append(self.lost_return(list(overrides), num, lost[job.job_id]))
            else:
                returns.append(job.results()[0])
        return returns

    def submit_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Job[Any]]:
        """Submit as one array: `BaseSubmititLauncher.launch` of hydra-submitit-launcher 1.2.0, without its wait."""
        import submitit

        assert self.config is not None
        assert len(job_overrides) > 0
        init_params = {"folder": self.params["submitit_folder"]}
        specific_init_keys = {"max_num_timeout"}
        init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in self.params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        params = {
            x if x in baseparams else f"{self._EXECUTOR}_{x}": y for x, y in self.params.items() if x not in init_keys
        }
        executor.update_parameters(**params)
        self.check_submission(executor, len(job_overrides))

        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return executor.map_array(self, *zip(*job_params, strict=True))

    def check_submission(self, executor: AutoExecutor, count: int) -> None:
        """Stop the sweep, with nothing submitted, when the cluster would refuse its `count` jobs; the local launcher
        has nothing to ask."""

    def wait_for_jobs(self, jobs: list[Job[Any]], initial_job_idx: int) -> dict[str, str]:
        """Poll until every job has a result or is lost; returns {job id: why it is lost}."""
        numbers = {job.job_id: num for num, job in enumerate(jobs, start=initial_job_idx)}
        pending = {job.job_id: job for job in jobs}
        gone_since: dict[str, float] = {}
        lost: dict[str, str] = {}
        while pending:
            for job_id in [job_id for job_id, job in pending.items() if has_result(job)]:
                del pending[job_id]
            gone = self.gone(list(pending.values())) if pending else set()
            now = time.monotonic()
            for job_id, job in list(pending.items()):
                if job_id not in gone:
                    gone_since.pop(job_id, None)
                elif now - gone_since.setdefault(job_id, now) >= self.lost_after_s and not has_result(job):
                    lost[job_id] = self.lost_reason(job)
                    log.warning("job #%d is lost: %s", numbers[job_id], lost[job_id])
                    del pending[job_id]
            if pending:
                time.sleep(POLL_S)
        return lost

    def gone(self, jobs: list[Job[Any]]) -> set[str]:
        """Ids of the `jobs` whose process or allocation no longer exists."""
        raise NotImplementedError

    def lost_reason(self, job: Job[Any]) -> str:
        """Why `job` ended without a result, as far as can be known, and where its log is."""
        raise NotImplementedError

    def lost_return(self, overrides: list[str], num: int, reason: str) -> JobReturn:
        """Record a lost job in its directory (unless it recorded its own end) and return a NaN result."""
        # imported here: Hydra imports this module whenever it scans for plugins, and these pull in torch
        from vitexp.logger import RESULTS_FILE, write_json
        from vitexp.rundir import FAILED_FILE

        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        job_dir = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        failure = job_dir / FAILED_FILE
        recorded = failure.exists() and failure.stat().st_mtime >= self.submitted_at  # by this launch's job itself
        if not (job_dir / RESULTS_FILE).exists() and not recorded:
            write_json(failure, {"error": reason})
        task_cfg = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
        return JobReturn(
            overrides=overrides,
            cfg=task_cfg,
            hydra_cfg=OmegaConf.masked_copy(config, "hydra"),
            working_dir=str(job_dir),
            task_name=config.hydra.job.name,
            status=JobStatus.COMPLETED,
            _return_value=float("nan"),
        )


class LocalLauncher(WaitingLauncher, plugin.LocalLauncher):
    """`hydra/launcher=submitit_local`: a job is lost when its process has exited without a result.

    submitit starts every job of the sweep at once on this machine. Unless `hydra.launcher.cpus_per_task`
    is set, each job gets an equal share of the CPUs for its torch threads and DataLoader workers
    (`trainer.threads` reads it), instead of every job using every core.
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        launcher = self.config.hydra.launcher
        if launcher.get("cpus_per_task") is None:
            # an Optuna search launches batches of up to n_jobs trials (its first, of resumed trials, may be smaller)
            at_once = max(len(job_overrides), self.config.hydra.sweeper.get("n_jobs") or 0)
            share = max(1, available_cpus() // at_once)
            # each job composes its config again from the command line's hydra overrides: add this one to them
            with open_dict(self.config), read_write(self.config):
                launcher.cpus_per_task = share
                self.config.hydra.overrides.hydra.append(f"hydra.launcher.cpus_per_task={share}")
            log.info(
                "submitit_local runs up to %d jobs at once: %d of %d CPUs each (set hydra.launcher.cpus_per_task to "
                "change it)",
                at_once,
                share,
                available_cpus(),
            )
        return super().launch(job_overrides, initial_job_idx)

    def gone(self, jobs: list[Job[Any]]) -> set[str]:
        return {job.job_id for job in jobs if job.done()}  # LocalJob.done: its process is no longer running

    def lost_reason(self, job: Job[Any]) -> str:
        # submitit's controller process (the job id) reaps the task without keeping its exit status
        return (
            f"its process (submitit job {job.job_id}) ended without a result: killed (by the out-of-memory killer or"
            f" kill -9?) or crashed; submitit does not record which; {log_hint(job)}"
        )


class SlurmLauncher(WaitingLauncher, plugin.SlurmLauncher):
    """`hydra/launcher=slurm`: a job is lost when squeue has stopped listing it and it left no result.

    squeue lists pending, running and completing jobs, requeued and preempted ones included (as PENDING),
    so only jobs that have ended count. Why a job ended comes from sacct when the cluster keeps accounting,
    else from slurmctld's memory of recently ended jobs (`scontrol show job`, for MinJobAge seconds). Before
    submitting, `check_submission` asks sbatch whether the cluster takes the jobs at all.
    """

    lost_after_s = 30.0
    squeue_patience_s = 600.0  # squeue failing this long: the jobs are given up as lost rather than awaited forever
    squeue_failing_since: float | None = None

    def check_submission(self, executor: AutoExecutor, count: int) -> None:
        """Ask sbatch whether it takes the array submitit is about to submit; a refusal ends the sweep (exit 2) with
        one line instead of the traceback of the FailedJobError that submitting it would raise. When sbatch cannot be
        asked, the jobs are submitted as they would be without this check."""
        if os.environ.get(CHECK_ENV) == "0":
            return
        slurm: SlurmExecutor = executor._executor
        answer = sbatch_answer(sbatch_script(slurm, count))
        if answer.accepted is None:
            log.warning("could not ask sbatch whether it takes these jobs (%s): submitting them unchecked", answer.said)
        if answer.accepted is not False:
            return
        keys = refused_keys(slurm, count, answer.said)
        print(f"error: nothing was launched: {refusal_text(answer.said, keys, self.params)}", file=sys.stderr)
        from vitexp.run import EXIT_USAGE  # imported here: it pulls in the whole training code

        sys.exit(EXIT_USAGE)

    def gone(self, jobs: list[Job[Any]]) -> set[str]:
        listed = squeue_listed(sorted({job.job_id.split("_")[0] for job in jobs}))
        if listed is None:  # squeue failed: nothing is known, so nothing is lost, for a while
            now = time.monotonic()
            self.squeue_failing_since = self.squeue_failing_since or now
            return {job.job_id for job in jobs} if now - self.squeue_failing_since > self.squeue_patience_s else set()
        self.squeue_failing_since = None
        return {job.job_id for job in jobs if job.job_id not in listed}

    def lost_reason(self, job: Job[Any]) -> str:
        if self.squeue_failing_since is not None:
            return (
                f"squeue has not answered for {self.squeue_patience_s:.0f} s, so SLURM job {job.job_id} is no longer"
                f" awaited; it may still be running and write its results; {log_hint(job)}"
            )
        sacct = slurm_command(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode", "-j", job.job_id])
        if sacct.returncode == 0 and sacct.stdout.strip():
            state, _, exit_code = sacct.stdout.strip().splitlines()[0].partition("|")
            return f"SLURM job {job.job_id} ended {state} ({exit_text(exit_code)}) without a result; {log_hint(job)}"
        if sacct.returncode == 0:
            sacct_note = "sacct has no record of it yet"
        else:
            sacct_note = f"SLURM accounting is not available (sacct: {first_line(sacct.stderr + sacct.stdout)})"
        scontrol = slurm_command(["scontrol", "-o", "show", "job", job.job_id])
        fields = dict(re.findall(r"(\w+)=(\S*)", scontrol.stdout)) if scontrol.returncode == 0 else {}
        if "JobState" in fields:
            return (
                f"SLURM job {job.job_id} ended {fields['JobState']} ({fields.get('Reason', 'None')}, "
                f"{exit_text(fields.get('ExitCode', '?'))}) without a result, as slurmctld reports; {sacct_note};"
                f" {log_hint(job)}"
            )
        return (
            f"SLURM job {job.job_id} left the queue without a result; the cause is unknown: {sacct_note}, and"
            f" slurmctld no longer knows the job; {log_hint(job)}"
        )


def sbatch_script(slurm: SlurmExecutor, count: int, unset: str | None = None) -> str:
    """The script submitit submits for `count` jobs (2 or more: one array), with the sbatch parameter `unset` left to
    the cluster's default."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = {name: value for name, value in slurm.parameters.items() if name != unset}
    if count > 1:
        params["map_count"] = count
    return _make_sbatch_string(command=slurm._submitit_command_str, folder=slurm.folder, **params)


def sbatch_answer(script: str) -> Answer:
    """Whether sbatch takes `script` (`--test-only`: nothing is submitted), and its messages, one line."""
    result = slurm_command(["sbatch", "--test-only"], stdin=script)
    lines = (SBATCH_PREFIX.sub("", line.strip()) for line in (result.stderr + result.stdout).splitlines())
    said = "; ".join(dict.fromkeys(line for line in lines if line))
    if result.returncode == 0:
        return Answer(True, said)
    if result.returncode in NOT_RUN or not said or UNANSWERED.search(said):
        return Answer(None, said or f"sbatch exited with status {result.returncode} and said nothing")
    return Answer(False, said)


def refused_keys(slurm: SlurmExecutor, count: int, said: str) -> list[str]:
    """The `hydra.launcher` keys behind sbatch's refusal `said`: those that sbatch takes the jobs without (each left
    to the cluster's default in turn), narrowed to those its message names; else those it names."""
    alone = [
        key
        for key, spec in LAUNCHER_KEYS.items()
        if slurm.parameters.get(spec.sbatch) is not None
        and sbatch_answer(sbatch_script(slurm, count, unset=spec.sbatch)).accepted
    ]
    named = [key for key, spec in LAUNCHER_KEYS.items() if spec.words.search(said)]
    return [key for key in alone if key in named] or alone or named


def refusal_text(said: str, keys: list[str], params: dict[str, Any]) -> str:
    """One line: sbatch's words, and how to change each of `keys` (else which keys sbatch was given)."""
    text = f'sbatch refuses the jobs ("{said}"): '
    if keys:
        return text + "; or ".join(LAUNCHER_KEYS[key].advice.format(value=params.get(key)) for key in keys)
    given = ", ".join(f"{key}={params[key]}" for key in LAUNCHER_KEYS if params.get(key) is not None)
    text += f"change the hydra.launcher key it is about (given: {given})"
    if "not available" in said:  # sbatch --test-only counts only nodes that are up: drained ones refuse too
        text += f"; if the partition's nodes are down or drained, {CHECK_ENV}=0 submits without asking"
    return text


def has_result(job: Job[Any]) -> bool:
    """Whether every task of `job` wrote its result pickle (what submitit's `done()` looks for first)."""
    folder = job.paths.folder
    with contextlib.suppress(OSError):  # as submitit does: an NFS client revalidates the folder, sees new files
        folder.chmod(folder.stat().st_mode)
    return all(job.task(k).paths.result_pickle.exists() for k in range(job.num_tasks))


def squeue_listed(array_ids: list[str]) -> set[str] | None:
    """The job ids (`<array>_<task>`, one per array task) squeue lists, or None when squeue cannot answer."""
    result = slurm_command(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(array_ids)])
    if result.returncode != 0:
        return set() if "Invalid job id" in result.stderr else None  # slurmctld has forgotten every one of them
    return set(result.stdout.split())


def slurm_command(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client; a missing or hung one is a failed call (status 127 or 124, as a shell and timeout(1) say),
    never an exception or a hang."""
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(args, NOT_RUN[0], "", str(err))
    except OSError as err:
        return subprocess.CompletedProcess(args, NOT_RUN[1], "", str(err))


def exit_text(exit_code: str) -> str:
    """SLURM's `<exit code>:<signal>`, with the signal it means (a shell reports 128 + N for signal N)."""
    code, _, sig = exit_code.partition(":")
    signum = int(sig) if sig.isdigit() and int(sig) else 0
    if not signum and code.isdigit() and 128 < int(code) < 128 + signal.NSIG:
        signum = int(code) - 128
    return f"exit code {exit_code}" + (f": {killed_by(signum)}" if signum else "")


def killed_by(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"killed by {name}" + (" (out of memory?)" if signum == signal.SIGKILL else "")


def log_hint(job: Job[Any]) -> str:
    """The job's submitit log, and its last line that says how the job ended (e.g. srun's `task 0: Killed`)."""
    paths = job.task(0).paths
    path = paths.stderr if paths.stderr.exists() else paths.stdout
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - 65536))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return f"log: {path} (not written)"
    line = next((line.strip() for line in reversed(lines) if END_LINE.search(line)), None)
    return f"log: {path}" + (f" ({line})" if line else "")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
