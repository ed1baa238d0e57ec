"""Batched augmentation on the training device: crop/flip, normalise, Cutout, Mixup, CutMix, Random
Erasing, label smoothing.

Everything takes a whole batch and uses tensor ops only (no Python loop over samples on a GPU; on the
CPU the resize goes image by image, where that is faster), drawing from generators the trainer owns and
checkpoints, so a resumed run draws the same numbers.

The training crop is `data.crop`: the random resized crop (ImageNet style, the default), a CIFAR-style
random crop of the zero-padded image (`pad_crop`), or none at all (`squash`: the stored images are the
whole pictures squashed to the model's size), for the recipes each of them comes from.

The `aug` group's options are registered in `AUGMENTATIONS` with their schemas; each builds a callable
`(images, soft_targets) -> (images, soft_targets)` on a normalised batch, as torchvision's reference
scripts do for RandomMixup and RandomCutmix. A new augmentation is one more registered class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


@dataclass
class MixupCutMixConfig(AugConfig):
    """Mixup or CutMix, one of them per batch (timm's `Mixup(switch_prob=...)`)."""

    name: str = "mixup_cutmix"
    mixup_alpha: float = 0.2  # a Mixup batch: lambda ~ Beta(mixup_alpha, mixup_alpha), one per batch
    cutmix_alpha: float = 1.0  # a CutMix batch: lambda ~ Beta(cutmix_alpha, cutmix_alpha), one per sample
    switch_prob: float = 0.5  # probability that a mixed batch gets CutMix rather than Mixup
    p: float = 1.0  # probability of mixing a batch at all (timm's prob)

    def rules(self) -> Iterator[Rule]:
        yield "mixup_alpha", self.mixup_alpha > 0, "a float > 0 (Beta(alpha, alpha))"
        yield "cutmix_alpha", self.cutmix_alpha > 0, "a float > 0 (Beta(alpha, alpha))"
        yield "switch_prob", 0 <= self.switch_prob <= 1, "a probability in [0, 1]"
        yield "p", 0 <= self.p <= 1, "a probability in [0, 1]"


ERASING_MODES = ("const", "pixel")


@dataclass
class RandomErasingConfig(AugConfig):
    """Random Erasing (Zhong et al. 2020) with torchvision's box distribution and timm's fill modes."""

    name: str = "random_erasing"
    p: float = 0.25  # probability of erasing a rectangle in an image (timm's re_prob)
    scale: list[float] = field(default_factory=lambda: [0.02, 1 / 3])  # erased area / image area: [min, max]
    ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # its aspect ratio h/w, log-uniform: [min, max]
    mode: str = "const"  # fill: const (zeros: the mean colour) or pixel (per-pixel N(0, 1) noise, as timm)

    def rules(self) -> Iterator[Rule]:
        yield "p", 0 <= self.p <= 1, "a probability in [0, 1]"
        scale, ratio = self.scale, self.ratio
        yield "scale", len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "[min, max] with 0 < min <= max <= 1"
        yield "ratio", len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "[min, max] with 0 < min <= max"
        yield "mode", self.mode in ERASING_MODES, f"one of {', '.join(ERASING_MODES)}"


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


def pad_crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by `padding` pixels per side, take the (H, W) window at `offsets` (top, left) in the
    padded image, mirrored where `flip`: torchvision's RandomCrop(size, padding) + RandomHorizontalFlip.

    One gather for the whole batch, any dtype and device; no pixel is resampled.
    """
    n, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = offsets[:, 0, None] + torch.arange(height, device=device)  # (n, H)
    across = torch.arange(width, device=device)
    cols = offsets[:, 1, None] + torch.where(flip[:, None], width - 1 - across, across)  # (n, W)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


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


def sample_erasing_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
    tries: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Erasing boxes (top, left, h, w) in pixels as torchvision's RandomErasing.get_params draws them, and
    whether one was found.

    All `tries` candidates of every image are drawn at once (area ~ U(scale) x H x W, log(h/w) ~ U(log ratio),
    sides rounded) and the first that fits (h < H and w < W, strictly, as torchvision) is kept; an image with
    none that fits is left alone, as torchvision does after its 10 attempts.
    """
    device = gen.device
    area = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=gen) * (height * width)
    log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = torch.exp(log_ratio)
    h = torch.sqrt(area * aspect).round()
    w = torch.sqrt(area / aspect).round()
    fits = (h < height) & (w < width)
    first = fits.float().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, device=device, generator=gen)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1), found


def random_erasing(
    images: torch.Tensor,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    mode: str,
    gen: torch.Generator,
) -> torch.Tensor:
    """Erase one rectangle per image with probability `p`: zeros (`const`) or N(0, 1) noise per pixel (`pixel`).

    On a normalised batch zero is the mean colour and N(0, 1) the data's own spread, as timm fills.
    """
    n, _, height, width = images.shape
    boxes, found = sample_erasing_boxes(n, height, width, scale, ratio, gen)
    top, left, h, w = boxes.unbind(1)
    mask, _ = box_masks(top + h / 2, left + w / 2, h / 2, w / 2, height, width)  # exactly [top, top + h) etc.
    applied = (torch.rand(n, device=images.device, generator=gen) < p) & found
    mask = (mask & applied[:, None, None])[:, None]
    if mode == "pixel":
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=gen)
        return torch.where(mask, noise, images)
    return images.masked_fill(mask, 0.0)


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


@AUGMENTATIONS.register("mixup_cutmix", MixupCutMixConfig)
class MixupOrCutMix:
    """Mixup or CutMix, one of them for each batch (DeiT's recipe, timm's `Mixup` with `switch_prob`).

    A batch is mixed with probability p; a mixed batch is CutMix with probability switch_prob (a box per
    sample, each with its own lambda, as `aug=cutmix`) and Mixup otherwise (one lambda, as `aug=mixup`).
    """

    def __init__(
        self, cfg: MixupCutMixConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator
    ) -> None:
        self.cfg, self.gen, self.np_rng = cfg, gen, np_rng

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, device = images.shape[0], images.device
        perm = torch.randperm(n, device=device, generator=self.gen)
        if self.np_rng.random() >= self.cfg.p:
            return images, targets
        if self.np_rng.random() < self.cfg.switch_prob:
            alpha = self.cfg.cutmix_alpha
            lam = to_device_async(torch.from_numpy(self.np_rng.beta(alpha, alpha, size=n)).float(), device)
            applied = torch.ones(n, dtype=torch.bool, device=device)
            mixed, targets, _ = cutmix(images, targets, lam, applied, perm, self.gen)
            return mixed, targets
        alpha = self.cfg.mixup_alpha
        return mixup(images, targets, float(self.np_rng.beta(alpha, alpha)), perm)


@AUGMENTATIONS.register("random_erasing", RandomErasingConfig)
class RandomErasing:
    """Random Erasing on normalised images; labels untouched. Boxes and noise come from the device generator."""

    def __init__(
        self, cfg: RandomErasingConfig, img_size: int, gen: torch.Generator, np_rng: np.random.Generator
    ) -> None:
        self.cfg, self.gen = cfg, gen
        self.scale, self.ratio = (cfg.scale[0], cfg.scale[1]), (cfg.ratio[0], cfg.ratio[1])

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return random_erasing(images, self.cfg.p, self.scale, self.ratio, self.cfg.mode, self.gen), targets


def smooth(targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label smoothing on a (possibly mixed) soft target: y' = y (1 - eps) + eps / K."""
    return targets * (1 - epsilon) + epsilon / targets.shape[-1]


class BatchAugment:
    """The training-time batch pipeline: uint8 batch + labels -> normalised float images + soft targets.

    Random numbers come from a torch generator on the device (crops, flips, boxes) and a NumPy generator
    (Beta draws, which torch cannot take from a generator); both are in `state_dict` for resume. The crop
    is `data.crop`: `random_resized` (crop_scale, crop_ratio, hflip), `pad_crop` (crop_padding, hflip) or
    `squash` (none); the last two take stored images of `data.img_size` and evaluate them as they are.
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
        """The center crop, normalised: the image as it is for `pad_crop` and `squash` (stored at img_size)."""
        return self.normalize(center_crop(images, self.data.img_size))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.augmentation(self.train_crop(images), F.one_hot(labels, self.num_classes).float())
        return x, smooth(y, self.smoothing)

    def train_crop(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch cropped (and flipped) as `data.crop` says, normalised."""
        n, size = images.shape[0], images.shape[-1]
        if self.data.crop == "random_resized":
            scale, ratio = self.data.crop_scale, self.data.crop_ratio
            boxes = sample_crop_boxes(n, size, (scale[0], scale[1]), (ratio[0], ratio[1]), self.gen)
            flip = torch.rand(n, device=images.device, generator=self.gen) < self.data.hflip
            # crop first, then normalise: fewer pixels
            return self.normalize(crop_flip_resize(images, boxes, flip, self.data.img_size, self.data.resample))
        if size != self.data.img_size or images.shape[-2] != self.data.img_size:
            raise ValueError(
                f"data.crop={self.data.crop} takes images stored at data.img_size={self.data.img_size} px, "
                f"got {images.shape[-2]}x{size} (load them at data.stored_size)"
            )
        if self.data.crop == "squash":  # the stored image is the whole picture: nothing to crop, no flip
            return self.normalize(images)
        pad = self.data.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=images.device, generator=self.gen)
        flip = torch.rand(n, device=images.device, generator=self.gen) < self.data.hflip
        return self.normalize(pad_crop_flip(images, pad, offsets, flip))

    def reseed(self, seed: int) -> None:
        """Start both generators again from `seed`: a rank that a resumed run's checkpoint has no draws for."""
        self.gen.manual_seed(seed)
        self.np_rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state

    def state_dict(self) -> dict:
        return {"torch": self.gen.get_state(), "numpy": self.np_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["torch"])
        self.np_rng.bit_generator.state = state["numpy"]
