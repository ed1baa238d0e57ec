"""The Weights & Biases sink (`logger=wandb`), and every W&B naming decision: run name, group, tags, job type
and config layout.

W&B problems never cost the run: without an API key or a reachable server the run is logged offline,
with one warning line giving the `wandb sync` command to upload it later.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitexp.checkpoint import BEST_FILE, LAST_FILE, atomic_write
from vitexp.config import LoggerConfig, Rule
from vitexp.logger import LOGGERS, RunIdentity, Sink, flatten

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"
SUMMARIES = {"val/acc": "max", "val/loss": "min", "val_ema/acc": "max", "val_swa/acc": "max"}
# what the run was and where and when it ran, not results
NOT_RESULTS = ("config", "config_hash", "choices", "seed", "smoothing", "device", "host", "started_at", "finished_at")
NAMED_GROUPS = ("model", "aug", "data")  # shown by option name in W&B's config, beside their full configs
VARYING_KEYS_FILE = "varying_keys.json"  # in a sweep's directory: the override keys that tell its jobs apart
CHECKPOINTS = {"best": BEST_FILE, "last": LAST_FILE}  # logger.wandb.log_model -> the checkpoint it logs
# logger.wandb.console -> W&B's settings; silent hides its header and footer, not its warnings (wandb.termwarn)
CONSOLE = {"quiet": {"silent": True}, "full": {}}


@dataclass
class WandbConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "vitexp"  # the W&B project runs are logged to
    entity: str | None = None  # your W&B user or team; None: the API key's default
    group: str | None = None  # None: the jobs of a sweep share one group named after it
    tags: list[str] = field(default_factory=list)  # first; the data set, model and sweep name are added
    notes: str | None = None  # the run's description in W&B
    mode: str = "online"  # online falls back to offline when W&B cannot be reached; or offline, disabled
    init_timeout: float = 30.0  # seconds to wait for the server before logging offline
    log_samples: bool = False  # log samples.png, the first training step's augmented images, once per run
    log_model: str | None = None  # best or last: that checkpoint as a "model" artifact at the end; None, none: no
    console: str = "quiet"  # quiet: W&B prints only its warnings; full: also its header and end-of-run footer

    def rules(self) -> Iterator[Rule]:
        yield "mode", self.mode in ("online", "offline", "disabled"), "online, offline or disabled"
        yield "init_timeout", self.init_timeout > 0, "seconds > 0"
        yield "log_model", self.log_model in (None, "none", *CHECKPOINTS), "none, best or last"
        yield "console", self.console in CONSOLE, " or ".join(CONSOLE)


def run_name(identity: RunIdentity, varying: set[str] | None = None) -> str:
    """The job's own overrides of the `varying` keys (`aug=cutmix,smoothing=0.1`): what the sweep's other jobs
    share would only repeat in every name. Without them (a single run, a sweep that did not record them, a
    one-job sweep) all its overrides, which differ between runs; with none, its model and augmentation."""
    if identity.role != "run":
        return identity.role
    own = [o for o in identity.overrides if not o.startswith(("+sweep=", "sweep=", "logger", "hydra."))]
    shown = [o for o in own if o.lstrip("+~").partition("=")[0] in varying] if varying else []
    return ",".join(shown or own) or ",".join(
        f"{g}={identity.choices[g]}" for g in ("model", "aug") if g in identity.choices
    )


def sweep_varying_keys(sweep_dir: Path | None) -> set[str] | None:
    """The keys the sweep's callback recorded before launch (a job sees only its own overrides); None if none."""
    if sweep_dir is None or not (sweep_dir / VARYING_KEYS_FILE).exists():
        return None
    return set(json.loads((sweep_dir / VARYING_KEYS_FILE).read_text())["varying_keys"])


def sweep_label(identity: RunIdentity) -> str | None:
    """The sweep's name(s), `aug_smoothing+seeds` for `+sweep=[aug_smoothing,seeds]`; None for a single run."""
    if identity.sweep_dir is None:
        return None
    return (identity.sweep_name or "sweep").strip("[]").replace(",", "+").replace(" ", "")


def sweep_group(identity: RunIdentity) -> str | None:
    """All jobs of a sweep share one group: its name(s) and start time, `aug_smoothing-2026-11-23-12-00-00`."""
    if identity.sweep_dir is None:
        return None
    return f"{sweep_label(identity)}-{'-'.join(identity.sweep_dir.parts[-2:])}"


def run_tags(user_tags: Sequence[str], config: dict[str, Any], identity: RunIdentity) -> list[str]:
    """The shell's tags first, then the data set, model and sweep name, so W&B filters on them without a
    config query; no repeats."""
    facts = [identity.choices.get(g) or config.get(g, {}).get("name") for g in ("data", "model")]
    return list(dict.fromkeys(tag for tag in [*user_tags, *facts, sweep_label(identity)] if tag))


def wandb_config(
    config: dict[str, Any], choices: dict[str, str], params: int | None, trial: int | None = None
) -> dict[str, Any]:
    """The run's config with the named groups also as plain option names, so W&B's table can filter on
    `aug == cutmix` while `aug_config` keeps the full settings; an Optuna search's trial number as `trial`."""
    if not config:
        return {}
    shown = config | {f"{group}_config": config[group] for group in NAMED_GROUPS}
    shown |= {group: choices.get(group, config[group]["name"]) for group in NAMED_GROUPS}
    shown |= {"trial": trial} if trial is not None else {}
    return shown | ({"params": params} if params is not None else {})


def search_trial(config: dict[str, Any], directory: Path, identity: RunIdentity) -> int | None:
    """The trial number of a job of `hparams_search=optuna`: its job number, the name of its directory."""
    searching = config.get("hparams_search") and identity.sweep_dir is not None
    return int(directory.name) if searching and directory.name.isdigit() else None


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
            tags=run_tags(cfg.tags, config, identity),
            notes=cfg.notes,
            name=run_name(identity, sweep_varying_keys(identity.sweep_dir)),
            job_type=job_type,
            config=wandb_config(config, identity.choices, params, search_trial(config, directory, identity)),
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
        console = CONSOLE[self.cfg.console]
        mode = os.environ.get("WANDB_MODE", self.cfg.mode)
        if mode != "online":
            return wandb.init(mode=mode, settings=wandb.Settings(**console), **kwargs)
        if not has_wandb_credentials():
            reason = "no W&B API key is configured"
        else:
            try:  # console=full greets the user first: a request to the server before the timeout starts
                settings = wandb.Settings(init_timeout=self.cfg.init_timeout, **console)
                return wandb.init(mode="online", settings=settings, **kwargs)
            except Exception as err:  # network, authentication, timeout: none may cost the run
                reason = f"W&B is unreachable ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
                wandb.teardown()  # else the offline run with the same id is refused as "in use"
        run = wandb.init(mode="offline", settings=wandb.Settings(**console), **kwargs)
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
        if self.run is None:
            return
        self.run.summary.update(flatten({k: v for k, v in results.items() if k not in NOT_RESULTS}))
        if self.cfg.log_model in CHECKPOINTS:
            self.log_model(self.cfg.log_model, results)

    def log_model(self, which: str, results: dict[str, Any]) -> None:
        """The `which` checkpoint as a "model" artifact of this run (Lightning's `model-<run id>` name), with
        what tells its weights apart; a failure is a warning, never the run's end."""
        import wandb

        path = self.directory / CHECKPOINTS[which]
        metadata = {
            "checkpoint": path.name,
            "config_hash": results["config_hash"],
            "choices": results["choices"],
            "best_epoch": results["best_epoch"],
            "best_val_acc": results["best_val"]["acc"],
        } | ({"test_acc": results["test"]["acc"]} if which == "best" else {})  # the test ran on best.pt
        try:
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=[which])
        except Exception as err:
            log.warning("could not log %s as a W&B artifact: %s: %s", path, type(err).__name__, err)

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
