"""Where a run's numbers go: `metrics.jsonl` and `results.json` in the run directory, and W&B when enabled."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vitexp.checkpoint import atomic_write
from vitexp.config import LoggerConfig
from vitexp.registry import Registry

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
WANDB_ID_FILE = "wandb_id"


class MetricsFileError(ValueError):
    """A JSON-lines file of a run has an unreadable line before its last one (not a cut-short write)."""


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda file: file.write(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file. A cut-short last line (a process killed mid-write) is dropped with a
    warning; an unreadable line before it is an error naming the file and the line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise MetricsFileError(
                    f"{path} line {number} is not JSON ({err.msg}): {line[:80]!r}; fix or remove that line"
                ) from None
            log.warning("%s: dropping its last line, cut short by an interrupted write: %r", path, line[:80])
    return rows


class RunLogger:
    """Per-epoch rows to `metrics.jsonl` (and W&B), final results to `results.json` (and the W&B summary).

    W&B problems never cost the run: without an API key or a reachable server the run is logged
    offline, with one warning line giving the `wandb sync` command to upload it later.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], name: str, job_type: str) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.metrics_path = run_dir / METRICS_FILE
        self.wandb_run = None
        if cfg.name == "wandb" and cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(config, name, job_type)

    def _init_wandb(self, config: dict[str, Any], name: str, job_type: str) -> Any:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # its exit-time telemetry can stall offline runs
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if not id_file.exists():  # saved before init so a resumed run continues the same W&B run
            atomic_write(id_file, lambda file: file.write(uuid.uuid4().hex[:12].encode()))
        kwargs = dict(
            project=self.cfg.project,
            entity=self.cfg.entity,
            group=self.cfg.group,
            tags=list(self.cfg.tags),
            name=name,
            job_type=job_type,
            config=config,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(self.run_dir),
        )
        mode = os.environ.get("WANDB_MODE", self.cfg.mode)
        if mode != "online":
            return wandb.init(mode=mode, **kwargs)
        if not has_wandb_credentials():
            reason = "no W&B API key is configured"
        else:
            try:  # silent: a non-silent init spends extra seconds greeting the user before the timeout starts
                settings = wandb.Settings(init_timeout=self.cfg.init_timeout, silent=True)
                return wandb.init(mode="online", settings=settings, **kwargs)
            except Exception as err:  # network, authentication, timeout: none may cost the run
                reason = f"W&B is unreachable ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
                wandb.teardown()  # else the offline run with the same id is refused as "in use"
        run = wandb.init(mode="offline", **kwargs)
        log.warning("%s; logging offline. Upload later with: wandb sync %s", reason, self.run_dir / "wandb")
        return run

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after `epoch` (written before a crash that the checkpoint does not cover)."""
        rows = [row for row in read_jsonl(self.metrics_path) if row["epoch"] <= epoch]
        atomic_write(self.metrics_path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def log_epoch(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in row.items() if k != "epoch"} | {"epoch": row["epoch"]}, step=row["epoch"]
            )

    def log_results(self, results: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(_flatten(results))

    def finish(self, exit_code: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def sweep_group(hydra_cfg: DictConfig, sweep_dir: Path) -> str:
    """The W&B group of a sweep: its name(s) and start time, e.g. `aug_smoothing-2026-11-23-12-00-00`."""
    name = str(hydra_cfg.runtime.choices.get("sweep") or "sweep").strip("[]").replace(",", "+").replace(" ", "")
    return f"{name}-{'-'.join(sweep_dir.parts[-2:])}"


# The logger options; both are RunLogger for now, which writes the files always and W&B for `wandb`.
LOGGERS: Registry[RunLogger] = Registry("logger")
LOGGERS.register("wandb", LoggerConfig)(RunLogger)
LOGGERS.register("none", LoggerConfig)(RunLogger)


def has_wandb_credentials() -> bool:
    """Whether an API key is configured (environment or netrc), checked without network or prompts."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        return bool(wbnetrc.read_netrc_auth(host=wandb.Settings().base_url))
    except Exception:  # an internal module: if it moves, try online and let the fallback handle it
        return True


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
