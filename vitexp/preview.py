"""Look at what the model will be trained on before spending a run on it: the augmentation preview.

`python -m vitexp.preview <train.py overrides> [preview.n=8] [preview.out=FILE]` builds the run's `Trainer`
for those overrides, takes the first training batch of epoch 1 and augments it with the trainer's own
`augment`, exactly as the first training step does (same seed, same images, same crops, boxes and λ), and
writes the first `n` images as the model sees them, un-normalised with `data.mean`/`data.std`, to one PNG:
`preview/<date>/<time>/preview.png`, or `preview.out`, never over an existing file.

Each image is titled with what its soft target says: the class, or the two classes mixed with the larger
share first and its weight λ ("cat & dog, λ=0.63"), with label smoothing taken out so λ is the mixing weight
Mixup or CutMix drew. The pixels are placed unresampled (each image scaled up by a whole factor, nearest
neighbour), so what the PNG shows is the batch itself, not an interpolation of it. The picture is
`vitexp.samples`'s, which also draws it into a run's directory as `samples.png` (`logger.wandb.log_samples=true`).

Bad overrides are refused with train.py's own messages; an unknown `preview.*` key names itself. Nothing but
the PNG is written: no run directory, checkpoint or logger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vitexp.cli import compose_train_config, parse_train_tool_args, run_tool
from vitexp.config import ConfigError
from vitexp.engine import Trainer
from vitexp.samples import DPI, Layout, first_batch, picture

log = logging.getLogger("vitexp")
PREFIX = "preview."


@dataclass
class PreviewConfig:
    n: int = 8  # images shown: the first n of the first training batch (at most data.batch_size)
    out: str | None = None  # the PNG written, which must not exist; None: preview/<date>/<time>/preview.png

    def rules(self) -> list[tuple[str, bool, str]]:
        return [
            ("n", self.n >= 1, "an integer >= 1"),
            ("out", self.out is None or self.out.lower().endswith(".png"), "a file name ending in .png"),
        ]


def parse_args(argv: Sequence[str]) -> tuple[PreviewConfig, list[str]]:
    """Split `preview.key=value` items (checked into a PreviewConfig) from the overrides for train.py's config."""
    return parse_train_tool_args(argv, PREFIX, PreviewConfig, "the preview", "preview.out")


def output_path(cfg: PreviewConfig) -> Path:
    """Where the PNG goes; an existing file is refused, never overwritten."""
    out = Path(cfg.out) if cfg.out is not None else Path("preview", datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    out = out if cfg.out is not None else out / "preview.png"
    if out.exists():
        raise ConfigError(refusal(out))
    return out


def refusal(out: Path) -> str:
    return f"{out} already exists: the preview never overwrites a file (set {PREFIX}out to a new file name)"


def preview(argv: Sequence[str]) -> dict[str, Any]:
    """Write the preview for these command-line arguments. Returns the output path (`out`), the images shown
    ([0, 1] float, on the CPU), their soft targets, titles and λs, and the grid `layout`."""
    cfg, overrides = parse_args(argv)
    out = output_path(cfg)
    typed, config, choices = compose_train_config(overrides)
    if cfg.n > typed.data.batch_size:
        batch = typed.data.batch_size
        raise ConfigError(f"{PREFIX}n={cfg.n} is not allowed: expected at most data.batch_size={batch} (one batch)")
    trainer = Trainer(typed, out.parent, config, choices)
    shown = first_batch(trainer, cfg.n)
    heading = shown.pop("heading")
    layout = write_new(shown["images"], shown["titles"], heading, out)
    log.info("wrote %s: %d images of the first training step (%s)", out, cfg.n, heading.split(": ", 1)[1])
    return {"out": out, **shown, "layout": layout}


def write_new(images: torch.Tensor, titles: Sequence[str], heading: str, path: Path) -> Layout:
    """Write the grid PNG to `path`, which must not exist; returns its layout."""
    fig, layout = picture(images, titles, heading)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file = path.open("xb")  # never overwrite, even a file made since the start
    except FileExistsError:
        raise ConfigError(refusal(path)) from None
    with file:
        try:
            fig.savefig(file, format="png", dpi=DPI)
        except BaseException:
            path.unlink()  # ours, and cut short
            raise
    return layout


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: a bad value or an existing output exits 2 with one line, as train.py's checks do."""
    run_tool(preview, __doc__, argv)


if __name__ == "__main__":
    main()
