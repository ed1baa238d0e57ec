"""The Weights & Biases sink (`logger=wandb`), and every W&B naming decision: run name, group, job type
and config layout.

W&B problems never cost the run: without an API key or a reachable server the run is logged offline,
with one warning line giving the `wandb sync` command to upload it later.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitexp.checkpoint import atomic_write
from vitexp.config import LoggerConfig, Rule
from vitexp.logger import LOGGERS, RunIdentity, Sink, flatten

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
SUMMARIES = {"val/acc": "max", "val/loss": "min", "val_ema/acc": "max", "val_swa/acc": "max"}
NOT_RESULTS = ("config", "config_hash", "choices", "seed", "smoothing", "device")  # what the run was, not results
NAMED_GROUPS = ("model", "aug", "data")  # shown by option name in W&B's config, beside their full configs


@dataclass
class WandbConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "vitexp"  # the W&B project runs are logged to
    entity: str | None = None  # your W&B user or team; None: the API key's default
    group: str | None = None  # None: the jobs of a sweep share one group named after it
    tags: list[str] = field(default_factory=list)  # shown and filterable in W&B
    mode: str = "online"  # online falls back to offline when W&B cannot be reached; or offline, disabled
    init_timeout: float = 30.0  # seconds to wait for the server before logging offline
    log_samples: bool = False  # log samples.png, the first training step's augmented images, once per run

    def rules(self) -> Iterator[Rule]:
        yield "mode", self.mode in ("online", "offline", "disabled"), "online, offline or disabled"
        yield "init_timeout", self.init_timeout > 0, "seconds > 0"


def run_name(identity: RunIdentity) -> str:
    """The job's own overrides (`aug=cutmix,seed=1`), or its model and augmentation when it has none."""
    if identity.role != "run":
        return identity.role
    own = [o for o in identity.overrides if not o.startswith(("+sweep=", "sweep=", "logger", "hydra."))]
    return ",".join(own) or ",".join(f"{g}={identity.choices[g]}" for g in ("model", "aug") if g in identity.choices)


def sweep_group(identity: RunIdentity) -> str | None:
    """All jobs of a sweep share one group: its name(s) and start time, `aug_smoothing-2026-11-23-12-00-00`."""
    if identity.sweep_dir is None:
        return None
    name = (identity.sweep_name or "sweep").strip("[]").replace(",", "+").replace(" ", "")
    return f"{name}-{'-'.join(identity.sweep_dir.parts[-2:])}"


def wandb_config(config: dict[str, Any], choices: dict[str, str], params: int | None) -> dict[str, Any]:
    """The run's config with the named groups also as plain option names, so W&B's table can filter on
    `aug == cutmix` while `aug_config` keeps the full settings."""
    if not config:
        return {}
    shown = config | {f"{group}_config": config[group] for group in NAMED_GROUPS}
    shown |= {group: choices.get(group, config[group]["name"]) for group in NAMED_GROUPS}
    return shown | ({"params": params} if params is not None else {})


class WandbSink(Sink):
    def __init__(
        self, cfg: WandbConfig, directory: Path, config: dict[str, Any], identity: RunIdentity, params: int | None
    ) -> None:
        self.cfg, self.directory = cfg, directory
        self.run = None
        if cfg.mode == "disabled":
            return
        job_type = identity.role if identity.role != "run" else identity.choices.get("model", config["model"]["name"])
        self.run = self._init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or sweep_group(identity),
            tags=list(cfg.tags),
            name=run_name(identity),
            job_type=job_type,
            config=wandb_config(config, identity.choices, params),
            dir=str(directory),
        )
        for epoch_metrics in ("train/*", "val/*", "val_ema/*", "val_swa/*"):
            self.run.define_metric(epoch_metrics, step_metric="epoch")
        for name, best in SUMMARIES.items():  # a running run's summary shows its best epoch's value so far
            self.run.define_metric(name, step_metric="epoch", summary=best)

    def _init(self, **kwargs: Any) -> Any:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # its exit-time telemetry can stall offline runs
        import wandb

        id_file = self.directory / WANDB_ID_FILE
        if not id_file.exists():  # saved before init so a resumed run continues the same W&B run
            atomic_write(id_file, lambda file: file.write(uuid.uuid4().hex[:12].encode()))
        kwargs |= {"id": id_file.read_text().strip(), "resume": "allow"}
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
        log.warning("%s; logging offline. Upload later with: wandb sync %s", reason, self.directory / "wandb")
        return run

    def log_epoch(self, row: dict[str, Any]) -> None:
        """At the epoch's last optimizer step, W&B's x-axis, so epochs and `log_step`'s rows share one axis;
        the epoch's charts use `epoch` as theirs."""
        if self.run is not None:
            self.run.log(row, step=row["step"])

    def log_step(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({key: value for key, value in row.items() if key != "step"}, step=row["step"])

    def log_results(self, results: dict[str, Any]) -> None:
        """The results into the run summary; what the run was (config, choices, seed) is the run's config."""
        if self.run is not None:
            self.run.summary.update(flatten({k: v for k, v in results.items() if k not in NOT_RESULTS}))

    def log_media(self, tables: Mapping[str, Sequence[dict[str, Any]]], images: Mapping[str, Path]) -> None:
        if self.run is None:
            return
        import wandb

        logged: dict[str, Any] = {
            name: wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            for name, rows in tables.items()
            if rows
        }
        self.run.log(logged | {name: wandb.Image(str(path)) for name, path in images.items()})

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


LOGGERS.register("wandb", WandbConfig)(WandbSink)


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
