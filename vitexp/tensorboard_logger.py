"""The TensorBoard sink (`logger=tensorboard`): event files in `<run dir>/tensorboard`.

`tensorboard --logdir multirun/<date>/<time>` then shows every job of a sweep as one run, its epochs as
scalars, its test metrics and settings in the HParams tab, and the sweep report's table and plots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.config import LoggerConfig, Rule
from vitexp.logger import LOGGERS, RunIdentity, Sink, flatten

HPARAM_KEYS = ("model", "aug", "data", "optim", "sched")  # option names shown beside the run's own overrides


@dataclass
class TensorBoardConfig(LoggerConfig):
    name: str = "tensorboard"
    dir: str = "tensorboard"  # event files go here, relative to the run directory
    flush_secs: float = 30.0  # how often pending events reach the disk (all are written at the end)

    def rules(self) -> Iterator[Rule]:
        yield "dir", bool(self.dir) and not Path(self.dir).is_absolute(), "a path inside the run directory"
        yield "flush_secs", self.flush_secs > 0, "seconds > 0"


def hparams(identity: RunIdentity, config: dict[str, Any]) -> dict[str, Any]:
    """The settings a sweep compares: the group choices, then the job's own overrides (`optim.lr=...`)."""
    shown: dict[str, Any] = {group: identity.choices[group] for group in HPARAM_KEYS if group in identity.choices}
    for override in identity.overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith(("hydra.", "logger", "sweep")):
            shown[key] = value
    shown |= {"smoothing": config.get("smoothing"), "seed": config.get("seed")}
    return {key: value for key, value in shown.items() if isinstance(value, bool | int | float | str)}


class TensorBoardSink(Sink):
    def __init__(
        self,
        cfg: TensorBoardConfig,
        directory: Path,
        config: dict[str, Any],
        identity: RunIdentity,
        params: int | None,
    ) -> None:
        self.cfg, self.log_dir = cfg, directory / cfg.dir
        self.hparams = hparams(identity, config) if config else {}
        self.purge_step: int | None = None
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        """Opened at first use, so a resumed run opens it once, dropping the epochs its checkpoint lacks."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step, flush_secs=self.cfg.flush_secs)
        return self._writer

    def start(self, epoch: int) -> None:
        self.purge_step = epoch + 1 if epoch > 0 else None

    def log_epoch(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, global_step=row["epoch"])

    def log_results(self, results: dict[str, Any]) -> None:
        """Test metrics as scalars and, with the run's settings, as its row of the HParams tab."""
        metrics = flatten({"test": results["test"], "best_val": {"acc": results["best_val"]["acc"]}})
        # run_name ".": the entry lands in this run's own directory rather than a timestamped one
        self.writer.add_hparams(self.hparams, metrics, run_name=".", global_step=results["epochs"])

    def log_media(self, tables: Mapping[str, Sequence[dict[str, Any]]], images: Mapping[str, Path]) -> None:
        from PIL import Image

        for name, rows in tables.items():
            if rows:
                self.writer.add_text(name, markdown_table(rows))
        for name, path in images.items():
            with Image.open(path) as image:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
            self.writer.add_image(name, pixels, dataformats="HWC")

    def finish(self, exit_code: int) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


LOGGERS.register("tensorboard", TensorBoardConfig)(TensorBoardSink)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a markdown table, which TensorBoard's text tab renders."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
