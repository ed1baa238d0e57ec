"""A run directory: the files one run owns, the lock that keeps a second process out, and its state.

Everything here is checked before a run writes anything: a directory in use, a finished run of another
config, or checkpoints that cannot be resumed are refused while the directory is still exactly as it
was. Only then does the run record its config (`.hydra/`) and open its log.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from vitexp import checkpoint
from vitexp.checkpoint import BEST_FILE, LAST_FILE, CheckpointError, atomic_write
from vitexp.config import config_diff, config_hash, semantic_config
from vitexp.logger import RESULTS_FILE, write_json

log = logging.getLogger("vitexp")

LOCK_FILE = ".run.lock"
FAILED_FILE = "failed.json"
HYDRA_DIR = ".hydra"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunConflictError(RuntimeError):
    """The run directory holds work of a different config, or is in use; refusing to mix them."""


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> str:
    return "; ".join(config_diff(semantic_config(old), semantic_config(new))[:limit])


def _check_same_config(path: Path, stored: dict[str, Any], config: dict[str, Any]) -> None:
    if config_hash(stored) != config_hash(config):
        raise RunConflictError(
            f"{path} was made with a different config ({_differences(stored, config)}); use another run directory"
        )


@dataclass
class RunDir:
    """The files of one run. `finished` and `resumable` check them, writing nothing, before a run may start."""

    path: Path

    @property
    def last(self) -> Path:
        return self.path / LAST_FILE

    @property
    def best(self) -> Path:
        return self.path / BEST_FILE

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock; a second process gets a RunConflictError, not a share of the files."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunConflictError(f"{self.path} is in use by another running job; refusing to write into it") from None
        try:
            yield
        finally:
            lock.release()

    def finished(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The results of a finished run of this config; a finished run of another config is refused."""
        if not self.results.exists():
            return None
        results = json.loads(self.results.read_text())
        if results.get("config_hash") != config_hash(config):
            stored = results.get("config") or self._recorded_config()
            diff = f" ({_differences(stored, config)})" if stored else ""
            raise RunConflictError(
                f"{self.path} already holds a finished run of a different config{diff}; use another directory"
            )
        return results

    def _recorded_config(self) -> dict[str, Any] | None:
        """The config in `.hydra/config.yaml`, for runs whose results.json predates storing it."""
        path = self.path / HYDRA_DIR / "config.yaml"
        if not path.exists():
            return None
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        return config if isinstance(config, dict) else None

    def resumable(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """`last.pt` if there is one to resume, checked together with `best.pt` before anything is trained.

        The test runs on `best.pt`, so a missing or unreadable one is reported now rather than after the
        remaining epochs. A `best.pt` written in the epoch after `last.pt` (a kill between the two writes)
        is a real checkpoint of this run and is kept: the resumed epoch competes with it.
        """
        if not self.last.exists():
            return None
        # wandb_id: else the new run would continue the old one's W&B run
        advice = f"move {LAST_FILE}, {BEST_FILE} and wandb_id (if any) out of {self.path} to train from scratch"
        try:
            state = checkpoint.load(self.last)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; refusing to start over: {advice}") from None
        _check_same_config(self.last, state["config"], config)
        progress = state["progress"]
        if progress["best_epoch"] < 1:
            return state
        if not self.best.exists():
            raise CheckpointError(
                f"{self.best} is missing, but {self.last} records epoch {progress['best_epoch']} as the best so far "
                f"and the test needs it: restore it, or {advice}"
            )
        try:
            best = checkpoint.load(self.best)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; the test needs it: {advice}") from None
        _check_same_config(self.best, best["config"], config)
        newer = best["epoch"] > progress["epoch"] and best["val"]["acc"] > progress["best_acc"]
        if best["epoch"] != progress["best_epoch"] and not newer:
            raise CheckpointError(
                f"{self.best} holds epoch {best['epoch']}, but {self.last} records epoch {progress['best_epoch']} "
                f"as the best: {advice}"
            )
        if newer:
            log.info(
                "%s is from epoch %d, after %s; keeping it as the best so far", self.best, best["epoch"], self.last
            )
            progress["best_epoch"], progress["best_acc"] = best["epoch"], best["val"]["acc"]
        return state

    def record_config(self, cfg: DictConfig, hydra_root: DictConfig | None) -> None:
        """Write `.hydra/` as Hydra would (config, Hydra's config, overrides), once the run belongs here."""
        out = self.path / HYDRA_DIR
        files = {"config.yaml": cfg}
        if hydra_root is not None:
            files |= {"hydra.yaml": hydra_root, "overrides.yaml": hydra_root.hydra.overrides.task}
        for name, node in files.items():
            text = OmegaConf.to_yaml(node, resolve=False)
            atomic_write(out / name, lambda file, text=text: file.write(text.encode()))

    @contextmanager
    def logging_to(self, name: str) -> Iterator[None]:
        """Append the run's log lines to `<name>.log` in the directory while the block runs.

        An exception that ends the block is written there too, with its traceback, so the log says why the
        run ended; the console hears of it from whoever handles the exception.
        """
        handler = logging.FileHandler(self.path / f"{name}.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            yield
        except Exception:
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed", None, sys.exc_info()))
            raise
        finally:
            root.removeHandler(handler)
            handler.close()

    def record_failure(self, message: str, stopped: bool = False) -> None:
        """`stopped`: a stop signal ended the run after a checkpoint, so relaunching resumes it (not a failure of
        the experiment: an Optuna search resumes such a trial instead of telling the study it failed)."""
        write_json(self.path / FAILED_FILE, {"error": message, "stopped": stopped})

    def clear_failure(self) -> None:
        (self.path / FAILED_FILE).unlink(missing_ok=True)
