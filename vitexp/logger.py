"""Where a run's numbers go: a list of sinks behind one small protocol.

The metrics files (`metrics.jsonl` per epoch, `results.json` at the end) are always written; the
`logger` group adds optional sinks, any number at once (`logger=[wandb,tensorboard]`). A sink is one
module that subclasses `Sink` and registers its builder and schema in `LOGGERS`; each option's YAML
puts its config under `logger.<name>`. How a sink names a run (W&B's run name, group, job type) is
the sink's own business: it gets the facts in a `RunIdentity`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitexp.checkpoint import atomic_write
from vitexp.registry import Registry

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


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


@dataclass
class RunIdentity:
    """What a sink may name a run by: Hydra's group choices, the job's overrides and the sweep it is part of."""

    choices: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    sweep_name: str | None = None  # the named sweep(s) chosen, e.g. aug_smoothing; None for a single run
    sweep_dir: Path | None = None
    role: str = "run"  # "run", or "report" for a sweep's report


class Sink:
    """One destination of a run's numbers. The defaults do nothing, so a sink implements what it shows."""

    def start(self, epoch: int) -> None:
        """Training (re)starts after `epoch` finished epochs: drop anything logged for later ones."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One finished epoch's metrics (`row["epoch"]` is 1-based)."""

    def log_step(self, row: dict[str, Any]) -> None:
        """The learning rate and train loss at `row["step"]`, every `trainer.log_every` optimizer steps."""

    def log_results(self, results: dict[str, Any]) -> None:
        """The run's final results (test metrics of the best epoch, timings, config)."""

    def log_media(self, tables: Mapping[str, Sequence[dict[str, Any]]], images: Mapping[str, Path]) -> None:
        """Tables (rows of one schema) and PNG images, logged together."""

    def finish(self, exit_code: int) -> None:
        """The run ended, successfully (0) or not."""


class MetricsFiles(Sink):
    """`metrics.jsonl`, one row per epoch, flushed to disk before the epoch's checkpoint; `results.json`,
    which marks the run finished."""

    def __init__(self, directory: Path) -> None:
        self.metrics_path, self.results_path = directory / METRICS_FILE, directory / RESULTS_FILE

    def start(self, epoch: int) -> None:
        rows = [row for row in read_jsonl(self.metrics_path) if row["epoch"] <= epoch]
        atomic_write(self.metrics_path, lambda file: file.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def log_epoch(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(row) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def log_results(self, results: dict[str, Any]) -> None:
        write_json(self.results_path, results)


# The optional sinks, by option name; their builders take
# (their config, the run directory, the resolved config, the RunIdentity, the model's parameter count).
LOGGERS: Registry[Sink] = Registry("logger")


class Sinks(Sink):
    """Several sinks as one, called in list order."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    @classmethod
    def build(
        cls,
        configs: Mapping[str, Any],
        directory: Path,
        config: dict[str, Any],
        identity: RunIdentity,
        params: int | None = None,
    ) -> Sinks:
        """The sinks chosen in `configs` (`cfg.logger`), started for the run in `directory`."""
        sinks = cls([])
        try:
            for sink_config in configs.values():
                sinks.sinks.append(LOGGERS.build(sink_config, directory, config, identity, params))
        except BaseException:
            sinks.finish(exit_code=1)  # those already started must not be left open
            raise
        return sinks

    def start(self, epoch: int) -> None:
        for sink in self.sinks:
            sink.start(epoch)

    def log_epoch(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_epoch(row)

    def log_step(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_step(row)

    def log_results(self, results: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_results(results)

    def log_media(self, tables: Mapping[str, Sequence[dict[str, Any]]], images: Mapping[str, Path]) -> None:
        for sink in self.sinks:
            sink.log_media(tables, images)

    def finish(self, exit_code: int) -> None:
        for sink in self.sinks:
            sink.finish(exit_code)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of `a/b` keys, as dashboards show them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
