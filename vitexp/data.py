"""Datasets as uint8 image tensors of one stored size, split into train/val/test.

Images become `uint8 (3, S, S)` tensors as early as possible (decode, shorter side resized to S, center
crop; with `data.crop=squash` the whole image resized to S x S); every random transform and the
normalisation run later, batched, on the training device (`vitexp.augment`). So the CPU side is
deterministic: a batch depends only on which indices it holds, which is what makes mid-epoch resume
exact. Each dataset option is a loader registered in `DATASETS` (Oxford-IIIT Pet's, with its download
and decode cache, is in `vitexp.pets`); every one of them supports `data.val_fraction=0` (no hold-out:
the test split selects the model, see `vitexp.splits.make_splits`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from vitexp.config import DataConfig
from vitexp.pets import load_pets
from vitexp.registry import Registry
from vitexp.splits import (
    Splits,
    cache_dir_of,
    limit_splits,
    locked,
    make_splits,
    require_root,
    split_tensors,
    stratified_split,
)

log = logging.getLogger(__name__)

DATASETS: Registry[Splits] = Registry("data")  # every dataset option shares DataConfig; a loader each


def to_stored(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W[, C]) square arrays as uint8 (N, 3, size, size), resized only when the size differs."""
    images = images.unsqueeze(-1) if images.ndim == 3 else images
    images = images.permute(0, 3, 1, 2).expand(-1, 3, -1, -1) if images.shape[-1] == 1 else images.permute(0, 3, 1, 2)
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


@DATASETS.register("cifar10", DataConfig)
@DATASETS.register("fmnist", DataConfig)
def load_torchvision_arrays(cfg: DataConfig) -> Splits:
    """CIFAR-10 and Fashion-MNIST: torchvision's classes hold the whole split in memory already."""
    from torchvision.datasets import CIFAR10, FashionMNIST

    dataset_class = {"cifar10": CIFAR10, "fmnist": FashionMNIST}[cfg.name]
    root = Path(cfg.root).expanduser()
    require_root(root, cfg.download)
    with locked((cache_dir_of(cfg) or root) / f".{cfg.name}.lock"):  # one download for a whole sweep
        splits = [dataset_class(str(root), train=train, download=cfg.download) for train in (True, False)]
    tensors = []
    for split in splits:
        images = torch.as_tensor(np.asarray(split.data))
        tensors.append(TensorDataset(to_stored(images, cfg.stored_size), torch.as_tensor(split.targets).long()))
    train_idx, val_idx = stratified_split(tensors[0].tensors[1].tolist(), cfg.val_fraction, cfg.split_seed)
    classes = list(splits[0].classes)
    train, val = split_tensors(tensors[0], train_idx), split_tensors(tensors[0], val_idx)
    return make_splits(cfg, train, val, tensors[1], num_classes=len(classes), class_names=classes)


SYNTHETIC_IMAGES, SYNTHETIC_CLASSES = 4096, 10


@DATASETS.register("synthetic", DataConfig)
def load_synthetic(cfg: DataConfig) -> Splits:
    """Random images for benchmarks and smoke tests: real shapes, no files, nothing to learn."""
    generator = torch.Generator().manual_seed(cfg.split_seed)
    size = cfg.stored_size

    def make(n: int) -> TensorDataset:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        return TensorDataset(images, torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=generator))

    n_val = round(SYNTHETIC_IMAGES * cfg.val_fraction)
    names = [str(i) for i in range(SYNTHETIC_CLASSES)]
    train, val = make(SYNTHETIC_IMAGES - n_val), make(n_val)
    return make_splits(cfg, train, val, make(1024), SYNTHETIC_CLASSES, names)


DIGITS_TEST_FRACTION = 0.2


DIGITS_TEST_SEED = 12345  # fixed: the test set must not move with data.split_seed


@DATASETS.register("digits", DataConfig)
def load_digits_splits(cfg: DataConfig) -> Splits:
    """scikit-learn's 8x8 digits, scaled to uint8 and upsampled to the stored size, as three channels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().mul(255 / 16).unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=cfg.stored_size, mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    rest, test_idx = stratified_split(labels.tolist(), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    train_pos, val_pos = stratified_split(labels[rest].tolist(), cfg.val_fraction, cfg.split_seed)
    train_idx, val_idx = [rest[i] for i in train_pos], [rest[i] for i in val_pos]

    def subset(idx: list[int]) -> TensorDataset:
        return TensorDataset(images[idx], labels[idx])

    names = [str(d) for d in range(10)]
    return make_splits(cfg, subset(train_idx), subset(val_idx), subset(test_idx), num_classes=10, class_names=names)


DATASETS.register("pets", DataConfig)(load_pets)  # Oxford-IIIT Pet lives in a module of its own


def build_splits(cfg: DataConfig) -> Splits:
    """The registered dataset `cfg.name`, as its three splits (cut to `data.limit_batches` if set)."""
    return limit_splits(DATASETS.build(cfg), cfg)
