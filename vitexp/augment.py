"""Batched augmentation on the training device: crop/flip, normalise, Cutout/Mixup/CutMix, label smoothing.

Everything takes a whole batch and uses tensor ops only (no Python loop over samples on a GPU; on the
CPU the resize goes image by image, where that is faster), drawing from generators the trainer owns and
checkpoints, so a resumed run draws the same numbers.

The `aug` group's options are registered in `AUGMENTATIONS` with their schemas; each builds a callable
`(images, soft_targets) -> (images, soft_targets)` on a normalised batch, as torchvision's reference
scripts do for RandomMixup and RandomCutmix. A new augmentation is one more registered class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitexp.config import AugConfig, Config, DataConfig, Rule
from vitexp.device import to_device_async
from vitexp.registry import Registry

BatchAugmentation = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
AUGMENTATIONS: Registry[BatchAugmentation] = Registry("aug")


@dataclass
class CutoutConfig(AugConfig):
    name: str = "cutout"
    n_holes: int = 1  # squares zeroed per image
    length: int | None = None  # side of a hole in pixels; None: a quarter of data.img_size
    p: float = 1.0  # probability per image

    def rules(self) -> Iterator[Rule]:
        yield "n_holes", self.n_holes >= 1, "an integer >= 1"
        yield "length", self.length is None or self.length >= 1, "an integer >= 1 (pixels) or null"
        yield "p", 0 <= self.p <= 1, "a probability in [0, 1]"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        size = config.data.img_size
        if self.length is not None:
            yield "aug.length", self.length <= size, f"at most data.img_size={size} pixels"


@dataclass
class MixConfig(AugConfig):
    """Mixup and CutMix: a mixing weight drawn from Beta(alpha, alpha), applied with probability p."""

    alpha: float = 1.0  # lambda ~ Beta(alpha, alpha)
    p: float = 1.0  # probability of mixing a batch (mixup) or a sample (cutmix)

    def rules(self) -> Iterator[Rule]:
        yield "alpha", self.alpha > 0, "a float > 0 (Beta(alpha, alpha))"
        yield "p", 0 <= self.p <= 1, "a probability in [0, 1]"


@dataclass
class MixupConfig(MixConfig):
    name: str = "mixup"
    alpha: float = 0.2


@dataclass
class CutMixConfig(MixConfig):
    name: str = "cutmix"
    p: float = 0.5


def sample_crop_boxes(
    n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator, tries: int = 10
) -> torch.Tensor:
    """Random-resized-crop boxes (x0, y0, w, h) in pixels, as torchvision's RandomResizedCrop draws them.

    Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of `tries` candidates that fits
    is kept, and a sample with none that fits gets the whole image (torchvision's fallback for a square).
    """
    device = gen.device
    area = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=gen) * size * size
    log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w <= size) & (h <= size) & (w >= 1) & (h >= 1)
    first = fits.float().argmax(dim=1, keepdim=True)
    any_fits = fits.any(dim=1)
    w = torch.where(any_fits, w.gather(1, first).squeeze(1), torch.full_like(w[:, 0], size))
    h = torch.where(any_fits, h.gather(1, first).squeeze(1), torch.full_like(h[:, 0], size))
    u = torch.rand(n, 2, device=device, generator=gen)
    x0 = torch.floor(u[:, 0] * (size - w + 1))
    y0 = torch.floor(u[:, 1] * (size - h + 1))
    return torch.stack([x0, y0, w, h], dim=1)


def crop_flip_resize(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int, resample: str = "auto"
) -> torch.Tensor:
    """Crop each image to its box (x0, y0, w, h), mirror where `flip`, and resize to `out_size` (bilinear).

    On a GPU (or for float images) the whole batch is one `grid_sample`. With `resample="auto"` a uint8 batch on
    the CPU takes the per-image path instead: PyTorch's vectorised uint8 resize is 3x faster there than a float
    `grid_sample`; `resample="grid_sample"` runs the GPU's path on the CPU too.
    """
    if resample == "auto" and images.device.type == "cpu" and images.dtype == torch.uint8:
        return crop_flip_resize_per_image(images, boxes, flip, out_size)
    return crop_flip_resize_batched(images.float(), boxes, flip, out_size)


def crop_flip_resize_batched(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int
) -> torch.Tensor:
    """The whole batch in one `grid_sample` (float in, float 0-255 out): one kernel on a GPU."""
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    scale_x, scale_y = w / width, h / height
    shift_x = (2 * x0 + w) / width - 1
    shift_y = (2 * y0 + h) / height - 1
    scale_x = torch.where(flip, -scale_x, scale_x)
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack([torch.stack([scale_x, zeros, shift_x], 1), torch.stack([zeros, scale_y, shift_y], 1)], 1)
    grid = F.affine_grid(theta, [n, images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_flip_resize_per_image(
    images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, out_size: int
) -> torch.Tensor:
    """Image by image with the antialiased uint8 resize torchvision's v2 `Resize` runs (uint8 in and out).

    Input and output are channels_last, the layout that kernel reads and writes, so no crop is copied twice.
    """
    images = images.contiguous(memory_format=torch.channels_last)
    out = torch.empty(
        (images.shape[0], images.shape[1], out_size, out_size), dtype=torch.uint8, memory_format=torch.channels_last
    )
    for i, ((x0, y0, w, h), mirror) in enumerate(zip(boxes.int().tolist(), flip.tolist(), strict=True)):
        crop = images[i : i + 1, :, y0 : y0 + h, x0 : x0 + w]
        resized = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 1] = resized.flip(-1) if mirror else resized
    return out


def center_crop(images: torch.Tensor, out_size: int) -> torch.Tensor:
    top = (images.shape[-2] - out_size) // 2
    left = (images.shape[-1] - out_size) // 2
    return images[..., top : top + out_size, left : left + out_size]


def box_masks(
    centers_y: torch.Tensor,
    centers_x: torch.Tensor,
    half_h: torch.Tensor,
    half_w: torch.Tensor,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (..., H, W) masks of boxes [c - half, c + half) clipped to the image, and their pixel areas."""
    rows = torch.arange(height, device=centers_y.device)
    cols = torch.arange(width, device=centers_x.device)
    y1, y2 = (centers_y - half_h).clamp(0, height), (centers_y + half_h).clamp(0, height)
    x1, x2 = (centers_x - half_w).clamp(0, width), (centers_x + half_w).clamp(0, width)
    in_rows = (rows >= y1[..., None]) & (rows < y2[..., None])
    in_cols = (cols >= x1[..., None]) & (cols < x2[..., None])
    return in_rows[..., :, None] & in_cols[..., None, :], (y2 - y1) * (x2 - x1)


def cutout(images: torch.Tensor, n_holes: int, length: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero `n_holes` squares of side `length` (clipped at the border) in each sample with probability `p`."""
    n, _, height, width = images.shape
    device = images.device
    cy = torch.randint(0, height, (n, n_holes), device=device, generator=gen)
    cx = torch.randint(0, width, (n, n_holes), device=device, generator=gen)
    half = torch.full_like(cy, length // 2)
    holes, _ = box_masks(cy, cx, half, half, height, width)
    applied = torch.rand(n, device=device, generator=gen) < p
    mask = holes.any(dim=1) & applied[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


def mixup(
    images: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex combination of each sample with its partner `perm[i]`, images and soft targets alike."""
    return images.lerp(images[perm], 1 - lam), targets.lerp(targets[perm], 1 - lam)


def cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    lam: torch.Tensor,
    applied: torch.Tensor,
    perm: torch.Tensor,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a box of area ~(1 - lam) from partner `perm[i]` into sample i where `applied`.

    The box is clipped at the border, so the label weight is recomputed from the pasted area:
    lam_i = 1 - area_i / (H * W) (1 where not applied). Returns images, targets and those lam_i.
    """
    n, _, height, width = images.shape
    device = images.device
    cut = torch.sqrt(1 - lam)
    half_h, half_w = torch.floor(height * cut) // 2, torch.floor(width * cut) // 2
    cy = torch.randint(0, height, (n,), device=device, generator=gen)
    cx = torch.randint(0, width, (n,), device=device, generator=gen)
    boxes, area = box_masks(cy, cx, half_h, half_w, height, width)
    boxes &= applied[:, None, None]
    lam_true = torch.where(applied, 1 - area / (height * width), torch.ones_like(lam))
    mixed = torch.where(boxes[:, None], images[perm], images)
    weight = lam_true[:, None].to(targets.dtype)
    return mixed, weight * targets + (1 - weight) * targets[perm], lam_true


@AUGMENTATIONS.register("none", AugConfig)
class NoAugmentation:
    def __init__(self, cfg: AugConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator) -> None:
        pass

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets


@AUGMENTATIONS.register("cutout", CutoutConfig)
class Cutout:
    """Cutout (DeVries & Taylor 2017) on normalised images, so a hole is the mean colour."""

    def __init__(self, cfg: CutoutConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator) -> None:
        self.cfg, self.length, self.gen = cfg, cfg.length or img_size // 4, gen

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cutout(images, self.cfg.n_holes, self.length, self.cfg.p, self.gen), targets


@AUGMENTATIONS.register("mixup", MixupConfig)
class Mixup:
    """Mixup (Zhang et al. 2018): the whole batch mixed with a permutation of itself by one lambda."""

    def __init__(self, cfg: MixupConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator) -> None:
        self.cfg, self.gen, self.np_rng = cfg, gen, np_rng

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(images.shape[0], device=images.device, generator=self.gen)
        alpha = self.cfg.alpha
        lam = float(self.np_rng.beta(alpha, alpha)) if self.np_rng.random() < self.cfg.p else 1.0
        return mixup(images, targets, lam, perm)


@AUGMENTATIONS.register("cutmix", CutMixConfig)
class CutMix:
    """CutMix (Yun et al. 2019): per sample, with probability p, a box pasted from a partner image."""

    def __init__(self, cfg: CutMixConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator) -> None:
        self.cfg, self.gen, self.np_rng = cfg, gen, np_rng

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, device = images.shape[0], images.device
        perm = torch.randperm(n, device=device, generator=self.gen)
        lam = torch.from_numpy(self.np_rng.beta(self.cfg.alpha, self.cfg.alpha, size=n)).float()
        lam = to_device_async(lam, device)
        applied = torch.rand(n, device=device, generator=self.gen) < self.cfg.p
        mixed, targets, _ = cutmix(images, targets, lam, applied, perm, self.gen)
        return mixed, targets


def smooth(targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label smoothing on a (possibly mixed) soft target: y' = y (1 - eps) + eps / K."""
    return targets * (1 - epsilon) + epsilon / targets.shape[-1]


class BatchAugment:
    """The training-time batch pipeline: uint8 batch + labels -> normalised float images + soft targets.

    Random numbers come from a torch generator on the device (crops, flips, boxes) and a NumPy generator
    (Beta draws, which torch cannot take from a generator); both are in `state_dict` for resume.
    """

    def __init__(
        self, data: DataConfig, aug: AugConfig, num_classes: int, smoothing: float, device: torch.device, seed: int
    ) -> None:
        self.data, self.num_classes, self.smoothing = data, num_classes, smoothing
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.np_rng = np.random.default_rng(seed)
        self.augmentation = AUGMENTATIONS.build(aug, data.img_size, self.gen, self.np_rng)
        std = torch.tensor(data.std, device=device).view(1, 3, 1, 1) * 255
        self.scale = 1 / std  # (x - mean) / std as x * scale + shift: two in-place passes over a fresh copy
        self.shift = -torch.tensor(data.mean, device=device).view(1, 3, 1, 1) * 255 / std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """0-255 images (uint8 or float, any layout) to a new normalised contiguous float32 batch."""
        x = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return x.mul_(self.scale).add_(self.shift)

    def eval_batch(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(center_crop(images, self.data.img_size))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, size = images.shape[0], images.shape[-1]
        scale, ratio = self.data.crop_scale, self.data.crop_ratio
        boxes = sample_crop_boxes(n, size, (scale[0], scale[1]), (ratio[0], ratio[1]), self.gen)
        flip = torch.rand(n, device=images.device, generator=self.gen) < self.data.hflip
        # crop first, then normalise: fewer pixels
        x = self.normalize(crop_flip_resize(images, boxes, flip, self.data.img_size, self.data.resample))
        x, y = self.augmentation(x, F.one_hot(labels, self.num_classes).float())
        return x, smooth(y, self.smoothing)

    def state_dict(self) -> dict:
        return {"torch": self.gen.get_state(), "numpy": self.np_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["torch"])
        self.np_rng.bit_generator.state = state["numpy"]
