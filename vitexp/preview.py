"""Look at what the model will be trained on before spending a run on it: the augmentation preview.

`python -m vitexp.preview <train.py overrides> [preview.n=8] [preview.out=FILE]` builds the run's `Trainer`
for those overrides, takes the first training batch of epoch 1 and augments it with the trainer's own
`augment`, exactly as the first training step does (same seed, same images, same crops, boxes and λ), and
writes the first `n` images as the model sees them, un-normalised with `data.mean`/`data.std`, to one PNG:
`preview/<date>/<time>/preview.png`, or `preview.out`, never over an existing file.

Each image is titled with what its soft target says: the class, or the two classes mixed with the larger
share first and its weight λ ("cat & dog, λ=0.63"), with label smoothing taken out so λ is the mixing weight
Mixup or CutMix drew. The pixels are placed unresampled (each image scaled up by a whole factor, nearest
neighbour), so what the PNG shows is the batch itself, not an interpolation of it.

Bad overrides are refused with train.py's own messages; an unknown `preview.*` key names itself. Nothing but
the PNG is written: no run directory, checkpoint or logger.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp.config import ConfigError, DataConfig
from vitexp.engine import Trainer
from vitexp.lr_find import compose_train_config

log = logging.getLogger("vitexp")
PREFIX = "preview."
MIXED = 1e-6  # a class with less weight than this in an un-smoothed target is not part of the mix

# The grid, in pixels of the PNG (at DPI, so the figure's inches come out as whole pixels).
DPI = 100
COLUMNS = 4  # images per row
MIN_IMAGE_PX = 128  # small images are scaled up by a whole factor to at least this side
MIN_CELL_PX = 200  # room for a title under the narrowest image
PAD_PX = 6  # around each image
TITLE_PX = 30  # two lines of 8-point text above each image
HEADER_PX = 24  # one line saying what is shown


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
    fields = {f.name: f for f in dataclasses.fields(PreviewConfig)}
    values: dict[str, Any] = {}
    rest = []
    for arg in argv:
        if not arg.lstrip("+~").startswith(PREFIX):
            if arg.startswith("hydra."):
                raise ConfigError(f"{arg.split('=')[0]} is not read by the preview: set preview.out for its output")
            rest.append(arg)
            continue
        key, has_value, text = arg.lstrip("+~").removeprefix(PREFIX).partition("=")
        if key not in fields or not has_value:
            valid = ", ".join(PREFIX + name for name in fields)
            raise ConfigError(f"unknown key {PREFIX}{key} (expected {PREFIX}KEY=VALUE; valid keys: {valid})")
        if key == "n":
            try:
                values[key] = int(text)
            except ValueError:
                raise ConfigError(f"{PREFIX}n={text!r} is not allowed: expected an integer") from None
        else:
            values[key] = None if text in ("null", "") else text
    cfg = PreviewConfig(**values)
    for key, holds, allowed in cfg.rules():
        if not holds:
            raise ConfigError(f"{PREFIX}{key}={getattr(cfg, key)!r} is not allowed: expected {allowed}")
    return cfg, rest


def output_path(cfg: PreviewConfig) -> Path:
    """Where the PNG goes; an existing file is refused, never overwritten."""
    out = Path(cfg.out) if cfg.out is not None else Path("preview", datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    out = out if cfg.out is not None else out / "preview.png"
    if out.exists():
        raise ConfigError(refusal(out))
    return out


def refusal(out: Path) -> str:
    return f"{out} already exists: the preview never overwrites a file (set {PREFIX}out to a new file name)"


# --- the batch ----------------------------------------------------------------------------------------------
def first_training_step(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, soft targets) of the first training step of epoch 1, made as `Trainer.train_epoch` makes them."""
    images, labels = next(iter(trainer.feed.train(0, 0)))
    images, labels = trainer.to_device(images, labels)
    return trainer.augment(images, labels)


def unnormalize(inputs: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """Normalised model inputs back to [0, 1] images (float32, on the CPU), clamped where an augmentation's fill
    (Random Erasing's noise, say) lies outside the colours."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (inputs.detach().float().cpu() * std + mean).clamp(0, 1)


def mixed_classes(target: torch.Tensor, smoothing: float) -> list[tuple[int, float]]:
    """The (class, weight) pairs of a soft target's two largest entries that are part of its mix, largest
    first, with label smoothing taken out: y = (y' - ε/K) / (1 - ε)."""
    weights = (target.detach().double().cpu() - smoothing / target.numel()) / (1 - smoothing)
    top = torch.topk(weights, min(2, weights.numel()))
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return [pairs[0], *[(i, w) for i, w in pairs[1:] if w > MIXED]]


def describe(target: torch.Tensor, class_names: Sequence[str], smoothing: float) -> tuple[str, float]:
    """An image's title and λ (the larger share; 1.0 for a single class): "cat & dog, λ=0.63" or "cat"."""
    pairs = mixed_classes(target, smoothing)
    if len(pairs) == 1:
        return str(class_names[pairs[0][0]]), 1.0
    (first, lam), (second, _) = pairs
    return f"{class_names[first]} & {class_names[second]}, λ={show_lambda(lam)}", lam


def show_lambda(lam: float) -> str:
    """λ to two decimals, or as many more (up to six) as keep a mix from reading as λ=1.00."""
    digits = 2
    while round(lam, digits) >= 1 and digits < 6:
        digits += 1
    return f"{lam:.{digits}f}"


# --- the picture --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The grid of `n` images of `img_size` pixels, in PNG pixels: a header line, then rows of cells, each a
    title band over the image scaled up by `scale`, centred."""

    n: int
    img_size: int

    @property
    def cols(self) -> int:
        return min(self.n, COLUMNS)

    @property
    def rows(self) -> int:
        return math.ceil(self.n / self.cols)

    @property
    def scale(self) -> int:
        return max(1, math.ceil(MIN_IMAGE_PX / self.img_size))

    @property
    def image_px(self) -> int:
        return self.img_size * self.scale

    @property
    def cell_width(self) -> int:
        return max(self.image_px, MIN_CELL_PX) + 2 * PAD_PX

    @property
    def cell_height(self) -> int:
        return TITLE_PX + self.image_px + 2 * PAD_PX

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG."""
        return self.cols * self.cell_width, HEADER_PX + self.rows * self.cell_height

    def image_origin(self, i: int) -> tuple[int, int]:
        """(left, top) pixel of image `i` in the PNG."""
        row, col = divmod(i, self.cols)
        left = col * self.cell_width + (self.cell_width - self.image_px) // 2
        return left, HEADER_PX + row * self.cell_height + PAD_PX + TITLE_PX

    def title_anchor(self, i: int) -> tuple[float, float]:
        """(centre x, top y) pixel of image `i`'s title."""
        row, col = divmod(i, self.cols)
        return col * self.cell_width + self.cell_width / 2, HEADER_PX + row * self.cell_height + PAD_PX


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """[0, 1] float images (N, 3, H, W) as the uint8 (N, H, W, 3) pixels the PNG holds."""
    return images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def wrap(title: str, width_px: int) -> str:
    """A title too wide for its cell at 8 points broken after the "&"."""
    if len(title) * 5.5 <= width_px or " & " not in title:
        return title
    first, second = title.split(" & ", 1)
    return f"{first} &\n{second}"


def draw(images: torch.Tensor, titles: Sequence[str], heading: str, path: Path) -> Layout:
    """Write the grid PNG to `path` (which must not exist); returns its layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = Layout(len(images), images.shape[-1])
    width, height = layout.size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 4 / height, heading, ha="center", va="top", fontsize=8)
    pixels = to_pixels(images).repeat(layout.scale, axis=1).repeat(layout.scale, axis=2)
    for i, (image, title) in enumerate(zip(pixels, titles, strict=True)):
        left, top = layout.image_origin(i)
        fig.figimage(image, xo=left, yo=height - top - layout.image_px, origin="upper")
        x, y = layout.title_anchor(i)
        text = wrap(title, layout.cell_width - 2 * PAD_PX)
        fig.text(x / width, 1 - y / height, text, ha="center", va="top", fontsize=8, linespacing=1.1)
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
    inputs, targets = first_training_step(trainer)
    images, targets = unnormalize(inputs[: cfg.n], typed.data), targets[: cfg.n].detach().float().cpu()
    names = trainer.splits.class_names
    described = [describe(target, names, typed.smoothing) for target in targets]
    titles, lambdas = [title for title, _ in described], [lam for _, lam in described]
    smoothing = f", smoothing={typed.smoothing:g}" if typed.smoothing else ""
    heading = f"first training batch: aug={choices['aug']}, data={choices['data']}, seed={typed.seed}{smoothing}"
    layout = draw(images, titles, heading, out)
    log.info("wrote %s: %d images of the first training step (%s)", out, cfg.n, heading.split(": ", 1)[1])
    return {"out": out, "images": images, "targets": targets, "titles": titles, "lambdas": lambdas, "layout": layout}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: a bad value or an existing output exits 2 with one line, as train.py's checks do."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vitexp.models import PretrainedWeightsError
    from vitexp.rundir import LOG_FORMAT
    from vitexp.splits import DataError

    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        preview(args)
    except (ConfigError, HydraException, OmegaConfBaseException, DataError, PretrainedWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)  # 1: Hydra's composition errors, as train.py


if __name__ == "__main__":
    main()
