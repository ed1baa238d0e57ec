"""One run from the command line: Hydra's config in; a finished run directory, or one clear error, out.

`main` is the Hydra task. It refuses what must be refused while the run directory is still untouched
(a bad config, a directory in use or holding another config, checkpoints that cannot be resumed), only
then records the config and the log there, trains, and turns every outcome into an exit status (a
single run) or a record in the job's directory (a sweep job), so a sweep always gets to its summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import UncompletedJobError

from vitexp.averaging import averaging_hooks
from vitexp.checkpoint import BEST_FILE, CheckpointError
from vitexp.cluster import EXIT_STOPPED, StopSignals, in_submitit_job, resume_command
from vitexp.config import GROUPS, SINK_GROUP, Config, ConfigError, validate
from vitexp.device import select_device
from vitexp.distributed import ProcessGroup
from vitexp.engine import Hook, NonFiniteError, Trainer
from vitexp.feed import local_batch_size
from vitexp.figures import figure_hooks
from vitexp.logger import RESULTS_FILE, MetricsFileError, RunIdentity, Sinks
from vitexp.models import PretrainedWeightsError
from vitexp.probing import probe_hooks
from vitexp.rundir import RunConflictError, RunDir
from vitexp.samples import samples_hooks
from vitexp.splits import DataError
from vitexp.stopping import stopping_hooks

log = logging.getLogger("vitexp")

EXIT_FAILED, EXIT_USAGE = 1, 2
USAGE_ERRORS = (ConfigError, RunConflictError)  # the command is wrong: nothing was run
# failures a line of text explains fully: no traceback
RUN_ERRORS = (CheckpointError, DataError, MetricsFileError, NonFiniteError, PretrainedWeightsError)


def run(
    cfg: DictConfig,
    run_dir: Path,
    identity: RunIdentity,
    stop: StopSignals | None = None,
    hydra_root: DictConfig | None = None,
) -> dict[str, Any]:
    """Validate, then train and test in `run_dir`; a finished run there is returned, not redone.

    `hydra_root` is Hydra's own config, recorded in `.hydra/` beside the run's. Returns the results, or
    {} when a stop signal ended the run after a checkpoint.

    On several processes (torchrun, or a SLURM job of several tasks) every rank calls this, and rank 0 alone
    touches the directory: it takes the lock, checks, records and logs there, and tells the other ranks what it
    found (a finished run, a checkpoint to resume, or the error that refuses the run), so they never wait for a
    rank that has given up. They train in rank 0's directory (its time-stamped default may name another second).
    """
    typed = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    group = ProcessGroup.from_env()
    device = group.device(select_device(typed.trainer.device))
    check_ranks(typed, group, device)
    with group.started(device):
        directory = RunDir(group.from_main(run_dir))
        if not group.is_main:
            if directory.path != run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # the empty directory Hydra made of this rank's own clock
            return _follow(typed, directory, config, identity, stop, group)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(directory.locked())
                done = directory.finished(config)
                decision = ("done", done) if done is not None else ("train", directory.resumable(config))
            except Exception as err:  # a refusal: the other ranks raise it too, rather than wait for rank 0
                group.from_main(("error", err))
                raise
            group.from_main(decision)
            if done is not None:
                log.info("%s already finished (test acc %.4f); not training again", run_dir, done["test"]["acc"])
                return done
            directory.record_config(cfg, hydra_root)
            with directory.logging_to(hydra_root.hydra.job.name if hydra_root is not None else "train"):
                for warning in typed.warnings():
                    log.warning("%s", warning)
                directory.clear_failure()
                return _train(typed, directory, config, identity, stop, decision[1], group)


def check_ranks(typed: Config, group: ProcessGroup, device: torch.device) -> None:
    """Refuse, on every rank and before the directory is touched, what the ranks cannot run."""
    local_batch_size(typed.data.batch_size, group.world_size)
    if group.active and typed.trainer.sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA: torch's SyncBatchNorm does not run on the CPU")


def _follow(
    typed: Config,
    directory: RunDir,
    config: dict[str, Any],
    identity: RunIdentity,
    stop: StopSignals | None,
    group: ProcessGroup,
) -> dict[str, Any]:
    """A rank other than 0: do what rank 0 decided, and train beside it without touching the directory."""
    decision, value = group.from_main(None)
    if decision == "error":
        raise value
    if decision == "done":
        return value
    vitexp_log = logging.getLogger("vitexp")
    level = vitexp_log.level
    vitexp_log.setLevel(max(level, logging.WARNING))  # rank 0 tells the progress; the others only what goes wrong
    try:
        return _train(typed, directory, config, identity, stop, value, group)
    finally:
        vitexp_log.setLevel(level)


def _train(
    typed: Config,
    directory: RunDir,
    config: dict[str, Any],
    identity: RunIdentity,
    stop: StopSignals | None,
    state: dict[str, Any] | None,
    group: ProcessGroup,
) -> dict[str, Any]:
    hooks = [*averaging_hooks(typed), *stopping_hooks(typed), *probe_hooks(typed)]
    if group.is_main:  # pictures of the run, drawn alone into its directory
        hooks += [*figure_hooks(typed), *samples_hooks(typed)]
    hooks.append(RunClock())
    cpus = launcher_cpus()
    trainer = Trainer(typed, directory.path, config, identity.choices, stop, hooks, launcher_cpus=cpus, group=group)
    if group.is_main:
        sinks = Sinks.build(typed.logger, directory.path, config, identity, params=trainer.params)
    else:
        sinks = Sinks([])
    try:
        results = group.from_main(trainer.fit(sinks, state))  # every rank returns rank 0's results
    except BaseException:
        sinks.finish(exit_code=1)
        raise
    sinks.finish(exit_code=0)
    if not group.is_main:
        return results
    if results:  # finished: results.json exists, nothing will resume from the checkpoints
        for path, keep, key in (
            (directory.last, typed.trainer.keep_last, "keep_last"),
            (directory.best, typed.trainer.save_best, "save_best"),
        ):
            if not keep and path.exists():
                path.unlink()
                log.info("deleted %s (trainer.%s=false)", path, key)
    if results and identity.sweep_dir is None:  # a sweep's jobs end in its report instead
        following = next_command(directory.path)
        log.info("done: %s%s", directory.path / RESULTS_FILE, f"; next: {following}" if following else "")
    return results


class RunClock(Hook):
    """Where and when the run trained, in results.json: `host`, `started_at`, `finished_at` (Unix seconds, of the
    invocation that finished it), from which the sweep report tells which jobs shared a machine."""

    def start(self, trainer: Trainer) -> None:
        self.started_at = time.time()

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        results.update(host=socket.gethostname(), started_at=self.started_at, finished_at=time.time())


def next_command(run_dir: Path) -> str:
    """What a user looks at after a run: its predictions explained (if best.pt was kept), and its W&B run uploaded
    if it ran offline; "" when neither applies."""
    commands = [f"python -m vitexp.explain {run_dir}"] if (run_dir / BEST_FILE).exists() else []
    if any((run_dir / "wandb").glob("offline-run-*")):
        commands.append(f"wandb sync {run_dir / 'wandb'}")
    return " ; ".join(commands)


def launcher_cpus() -> int | None:
    """The CPUs the sweep's launcher gives each job (`hydra.launcher.cpus_per_task`), if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher.get("cpus_per_task")


def identity_from_hydra(hydra_cfg: DictConfig) -> RunIdentity:
    """The run's group choices and overrides; a sweep job also its sweep's name (or its search space's) and
    directory."""
    from hydra.types import RunMode

    chosen = hydra_cfg.runtime.choices
    choices = {group: str(chosen[group]) for group in (*GROUPS, SINK_GROUP) if group in chosen}
    identity = RunIdentity(choices, list(hydra_cfg.overrides.task))
    if hydra_cfg.mode == RunMode.MULTIRUN:
        search = f"search_{chosen['search']}" if chosen.get("search") else None  # hparams_search=optuna +search=...
        identity.sweep_name, identity.sweep_dir = chosen.get("sweep") or search, Path(hydra_cfg.sweep.dir)
    return identity


def check_single_run(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Refuse sweep-only settings without `-m`: they would silently train one run of the defaults."""
    if cfg.dry_run:
        raise ConfigError("dry_run=true lists the jobs of a sweep and launches nothing: add -m")
    if hydra_cfg.sweeper.get("params"):
        sweep = hydra_cfg.runtime.choices.get("sweep")
        source = f"+sweep={sweep}" if sweep else "hydra.sweeper.params"
        raise ConfigError(f"{source} defines a sweep, but without -m this would train one run: add -m")


def main(cfg: DictConfig) -> float:
    """Hydra task: one run in Hydra's output directory; returns the best validation accuracy.

    The return value is what an optimizing sweeper maximises, so it must never be a test metric (the
    test accuracy stays in results.json and the report). A single run ends a usage error with one line
    and exit status 2, a run failure with status 1 and a stop signal with `EXIT_STOPPED`. A sweep job
    records any of them in its directory and returns NaN, so the other jobs run and the sweep's end
    lists every job that did not finish.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_root = HydraConfig.instance().cfg
    assert hydra_root is not None
    hydra_cfg = hydra_root.hydra
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    directory = RunDir(Path(hydra_cfg.runtime.output_dir))
    with StopSignals() as stop:
        if multirun and stop.requested:
            log.info("not starting %s: the sweep was stopped by %s", directory.path, stop.requested.name)
            return math.nan
        try:
            if not multirun:
                check_single_run(cfg, hydra_cfg)
            join_submitit_tasks()
            results = run(cfg, directory.path, identity_from_hydra(hydra_cfg), stop, hydra_root)
        except Exception as err:
            return failed(err, directory, multirun)
        if not results:
            return stopped(stop, directory, multirun)
    return float(results["best_val"]["acc"])


def join_submitit_tasks() -> None:
    """A SLURM job of several tasks (`hydra.launcher.tasks_per_node`) is one run on several ranks: submitit knows
    the rendezvous (the first node, a port of the job id) and exports it as torchrun would."""
    if not in_submitit_job() or "RANK" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def failed(err: Exception, directory: RunDir, multirun: bool) -> float:
    """A sweep job records the error (unless the directory is not its own) and returns NaN; a single run exits."""
    known = isinstance(err, USAGE_ERRORS + RUN_ERRORS)
    if not multirun:
        if not known:
            raise err
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE if isinstance(err, USAGE_ERRORS) else EXIT_FAILED)
    if known:
        log.error("%s", err)
    else:
        log.exception("job failed")
    if not isinstance(err, RunConflictError) and ProcessGroup.from_env().is_main:
        last_line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        directory.record_failure(f"{type(err).__name__}: {last_line}")
    return math.nan


def stopped(stop: StopSignals, directory: RunDir, multirun: bool) -> float:
    """After a stop signal and a written `last.pt`: requeue through submitit, or record how to resume.

    A submitit job that is not requeued ends without a result (SystemExit passes submitit by), so its
    launcher keeps waiting while SLURM requeues the job after a preemption, and reports the job as
    not finished otherwise.
    """
    assert stop.requested is not None
    message = f"stopped by {stop.requested.name}; {directory.last} holds the progress"
    if stop.hands_to_submitit(stop.requested):
        try:
            stop.requeue()
        except UncompletedJobError as err:  # submitit will not requeue it again (e.g. timed out too often)
            directory.record_failure(f"{message}; not requeued: {err}", stopped=True)
            return math.nan
    if multirun:
        if ProcessGroup.from_env().is_main:
            directory.record_failure(
                f"{message}: relaunching the sweep (with its hydra.sweep.dir) resumes it", stopped=True
            )
        if in_submitit_job():
            sys.exit(EXIT_STOPPED)
        return math.nan
    group = ProcessGroup.from_env()
    if not group.is_main:  # rank 0 says how to resume
        sys.exit(EXIT_STOPPED)
    program = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', group.world_size)}"]
    resume = resume_command("hydra.run.dir", directory.path, program if group.active else ["python"])
    log.warning("%s. Resume with: %s", message, resume)
    print(f"{message}. Resume with:\n  {resume}", file=sys.stderr)
    sys.exit(EXIT_STOPPED)
