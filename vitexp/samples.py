"""The first training step's augmented images as a picture: for the preview command and for the run itself.

A run's numbers cannot show that the augmentation did something silly (a crop that cuts every object away, a
CutMix box the size of the image, the wrong normalisation). The picture does: the first `n` images of the
first training batch of epoch 1, augmented by the trainer's own `augment` exactly as the first training step
augments them (same seed, same images, same crops, boxes and λ), un-normalised with `data.mean`/`data.std`.

Each image is titled with what its soft target says: the class, or the two classes mixed with the larger
share first and its weight λ ("cat & dog, λ=0.63"), with label smoothing taken out so λ is the mixing weight
Mixup or CutMix drew. The pixels are placed unresampled (each image scaled up by a whole factor, nearest
neighbour), so the PNG shows the batch itself, not an interpolation of it.

`python -m vitexp.preview` (`vitexp.preview`) draws it before a run is spent. `Samples`, an `engine.Hook`,
draws it into a fresh run's directory as `samples.png` and sends it to the sinks, when a sink's config asks
for it (`logger.wandb.log_samples=true`). Drawing the batch must not change what trains: the hook puts back
every generator the draw advances, so the run's weights are bit-identical to the same run without it, and a
picture that cannot be drawn is a warning, never a failed run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitexp import checkpoint
from vitexp.config import Config, DataConfig
from vitexp.engine import Hook, Trainer

log = logging.getLogger("vitexp")

SAMPLES_FILE = "samples.png"
SAMPLES = 8  # images a run's samples.png shows (at most one batch)
MIXED = 1e-6  # a class with less weight than this in an un-smoothed target is not part of the mix

# The grid, in pixels of the PNG (at DPI, so the figure's inches come out as whole pixels).
DPI = 100
COLUMNS = 4  # images per row
MIN_IMAGE_PX = 128  # small images are scaled up by a whole factor to at least this side
MIN_CELL_PX = 200  # room for a title under the narrowest image
PAD_PX = 6  # around each image
TITLE_PX = 30  # two lines of 8-point text above each image
HEADER_PX = 24  # one line saying what is shown


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


def first_batch(trainer: Trainer, n: int) -> dict[str, Any]:
    """The first `n` images of the first training step as the picture shows them: `images` ([0, 1] float, on
    the CPU), their soft `targets`, `titles` and `lambdas`, and the picture's `heading`."""
    inputs, targets = first_training_step(trainer)
    cfg = trainer.cfg
    images, targets = unnormalize(inputs[:n], cfg.data), targets[:n].detach().float().cpu()
    described = [describe(target, trainer.splits.class_names, cfg.smoothing) for target in targets]
    titles, lambdas = [title for title, _ in described], [lam for _, lam in described]
    smoothing = f", smoothing={cfg.smoothing:g}" if cfg.smoothing else ""
    aug, data = (trainer.choices.get(group, getattr(cfg, group).name) for group in ("aug", "data"))
    heading = f"first training batch: aug={aug}, data={data}, seed={cfg.seed}{smoothing}"
    return {"images": images, "targets": targets, "titles": titles, "lambdas": lambdas, "heading": heading}


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


def picture(images: torch.Tensor, titles: Sequence[str], heading: str) -> tuple[Any, Layout]:
    """The grid as a matplotlib Figure on its own Agg canvas (no pyplot, no display), and its layout; write it
    with `fig.savefig(file, format="png", dpi=DPI)`."""
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
    return fig, layout


def draw(images: torch.Tensor, titles: Sequence[str], heading: str, path: Path) -> Layout:
    """Write the grid PNG to `path`, replacing it atomically (a run's own file); returns its layout."""
    fig, layout = picture(images, titles, heading)
    checkpoint.atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=DPI))
    return layout


# --- the hook -----------------------------------------------------------------------------------------------
@contextmanager
def generators_kept(trainer: Trainer) -> Iterator[None]:
    """Put back, on the way out, everything that drawing a training batch advances: the augmentation's
    generators, the global RNGs, the train DataLoader's own generator (each iteration draws a worker seed from
    it) and the epoch order's position."""
    augment, rngs = trainer.augment.state_dict(), checkpoint.rng_state()
    order = trainer.feed.order
    position = (order.epoch, order.start_batch, order.stop_batch)
    loader = None if trainer.feed.resident else trainer.feed.loaders["train"]
    loader_state = loader.generator.get_state() if loader is not None and loader.generator is not None else None
    try:
        yield
    finally:
        trainer.augment.load_state_dict(augment)
        checkpoint.set_rng_state(rngs)
        order.set_position(*position)
        if loader_state is not None:
            loader.generator.set_state(loader_state)


def write_samples(trainer: Trainer, n: int = SAMPLES) -> Path:
    """Draw the first training step's first `n` images (at most a batch) into `<run dir>/samples.png`, leaving
    every generator training draws from as it was."""
    with generators_kept(trainer):
        shown = first_batch(trainer, min(n, trainer.cfg.data.batch_size))
    path = trainer.run_dir / SAMPLES_FILE
    draw(shown["images"], shown["titles"], shown["heading"], path)
    return path


class Samples(Hook):
    """At the start of a fresh run (no step trained yet), draws `samples.png` into the run directory and sends
    it to the sinks; a failure is a warning. A resumed run does not draw it again.

    It keeps no state, so a run resumes whether or not the resuming command asks for samples (logger keys may
    change between a run and its resume).
    """

    def __init__(self, n: int = SAMPLES) -> None:
        self.n = n

    def start(self, trainer: Trainer) -> None:
        if trainer.progress.step != 0 or trainer.progress.batch != 0:
            return
        start = time.perf_counter()
        try:
            path = write_samples(trainer, self.n)
            trainer.sinks.log_media({}, {"samples": path})
        except Exception as err:  # a picture must never cost the run
            log.warning("could not draw the training samples: %s: %s", type(err).__name__, err, exc_info=True)
            return
        log.info("samples: %s in %.2fs", path.name, time.perf_counter() - start)


def samples_hooks(cfg: Config) -> list[Hook]:
    """The samples picture, when a chosen sink's config asks for it (`logger.wandb.log_samples=true`)."""
    wanted = any(getattr(sink, "log_samples", False) for sink in cfg.logger.values())
    return [Samples()] if wanted else []
