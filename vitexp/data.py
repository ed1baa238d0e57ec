"""Datasets as uint8 image tensors of one stored size, split into train/val/test.

Images become `uint8 (3, S, S)` tensors as early as possible (decode, shorter side resized to S, center
crop); every random transform and the normalisation run later, batched, on the training device
(`vitexp.augment`). So the CPU side is deterministic: a batch depends only on which indices it holds,
which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.datasets import OxfordIIITPet
from torchvision.transforms import v2

from vitexp.config import DataConfig

log = logging.getLogger(__name__)

# The 37 breeds of the dataset definition, in label order (annotation class id - 1). A partial copy of
# Pets lists fewer breeds, so the class count must never come from the labels present.
PETS_CLASSES = (
    "Abyssinian",
    "American Bulldog",
    "American Pit Bull Terrier",
    "Basset Hound",
    "Beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "Boxer",
    "British Shorthair",
    "Chihuahua",
    "Egyptian Mau",
    "English Cocker Spaniel",
    "English Setter",
    "German Shorthaired",
    "Great Pyrenees",
    "Havanese",
    "Japanese Chin",
    "Keeshond",
    "Leonberger",
    "Maine Coon",
    "Miniature Pinscher",
    "Newfoundland",
    "Persian",
    "Pomeranian",
    "Pug",
    "Ragdoll",
    "Russian Blue",
    "Saint Bernard",
    "Samoyed",
    "Scottish Terrier",
    "Shiba Inu",
    "Siamese",
    "Sphynx",
    "Staffordshire Bull Terrier",
    "Wheaten Terrier",
    "Yorkshire Terrier",
)
PETS_COMPLETE_MARKER = ".vitexp-complete"


class DataError(RuntimeError):
    """The dataset on disk is missing, incomplete or holds an unreadable file (named in the message)."""


@dataclass
class Splits:
    """The three splits as datasets of `(uint8 (3, S, S) image, int label)` plus the label space."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: Sequence[str]


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices so each class keeps `val_fraction` of its samples in val (rounded), seeded.

    Written here rather than taken from scikit-learn because that one refuses classes with one sample,
    which a partial copy of a dataset has.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, val = [], []
    for cls in np.unique(labels_arr):
        members = rng.permutation(np.flatnonzero(labels_arr == cls))
        n_val = round(len(members) * val_fraction)
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)


def to_uint8_square(size: int) -> v2.Compose:
    """PIL image -> uint8 (3, size, size): shorter side resized to `size`, then center-cropped."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])


class PetsImages(Dataset):
    """torchvision's OxfordIIITPet yielding uint8 squares; a file that cannot be decoded is named in the error."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        self.pets = OxfordIIITPet(root, split=split, transform=to_uint8_square(size))

    @property
    def labels(self) -> list[int]:
        return self.pets._labels

    def __len__(self) -> int:
        return len(self.pets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return self.pets[index]
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {self.pets._images[index]}: {err}") from err


def _missing_pets_files(base: Path) -> list[Path]:
    """Files the annotation lists name that are not on disk (a half-extracted or truncated tree)."""
    missing = []
    for split in ("trainval", "test"):
        listing = base / "annotations" / f"{split}.txt"
        if not listing.is_file():
            missing.append(listing)
            continue
        for line in listing.read_text().splitlines():
            if line.strip():
                image = base / "images" / f"{line.split()[0]}.jpg"
                if not image.is_file():
                    missing.append(image)
    return missing


def prepare_pets(root: Path, download: bool) -> Path:
    """Make sure a complete Pets tree is under `root`, downloading it at most once across processes.

    Concurrent jobs of a sweep share `root`: a file lock serialises the download, and a marker written
    after the tree checks out tells a complete tree from one a killed job left half-extracted.
    """
    root.mkdir(parents=True, exist_ok=True)
    base = root / "oxford-iiit-pet"
    with FileLock(str(root / ".oxford-iiit-pet.lock")):
        if (base / PETS_COMPLETE_MARKER).exists():
            return base
        missing = _missing_pets_files(base) if base.exists() else [base]
        if missing and download:
            if base.exists():
                log.warning("Pets tree at %s is incomplete (%d files missing); downloading again", base, len(missing))
                shutil.rmtree(base)
            OxfordIIITPet(root, split="trainval", download=True)
            missing = _missing_pets_files(base)
        if missing:
            hint = "set data.download=true" if not download else "delete it and run again"
            raise DataError(
                f"Oxford-IIIT Pet at {base} is incomplete: {len(missing)} files missing, e.g. {missing[0]} ({hint})"
            )
        (base / PETS_COMPLETE_MARKER).write_text("ok\n")
    return base


def load_pets(cfg: DataConfig) -> Splits:
    root = Path(cfg.root).expanduser()
    prepare_pets(root, cfg.download)
    trainval = PetsImages(root, "trainval", cfg.stored_size)
    test = PetsImages(root, "test", cfg.stored_size)
    train_idx, val_idx = stratified_split(trainval.labels, cfg.val_fraction, cfg.split_seed)
    return Splits(
        train=torch.utils.data.Subset(trainval, train_idx),
        val=torch.utils.data.Subset(trainval, val_idx),
        test=test,
        num_classes=len(PETS_CLASSES),
        class_names=PETS_CLASSES,
    )


DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 12345  # fixed: the test set must not move with data.split_seed


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
    return Splits(subset(train_idx), subset(val_idx), subset(test_idx), num_classes=10, class_names=names)


def build_splits(cfg: DataConfig) -> Splits:
    loaders = {"pets": load_pets, "digits": load_digits_splits}
    return loaders[cfg.name](cfg)


class EpochOrder(Sampler[int]):
    """The training order of one epoch, a pure function of (seed, epoch), optionally from a batch offset.

    Deriving the order instead of drawing it from a stateful generator means a resumed run needs only
    (epoch, batch) to continue exactly where the interrupted one stopped. Only full batches are served.
    """

    def __init__(self, size: int, batch_size: int, batches_per_epoch: int, seed: int) -> None:
        self.size, self.batch_size, self.batches_per_epoch, self.seed = size, batch_size, batches_per_epoch, seed
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.start_batch * self.batch_size : self.batches_per_epoch * self.batch_size].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def make_loader(dataset: Dataset, batch_size: int, cfg: DataConfig, sampler: Sampler | None, pin: bool) -> DataLoader:
    """A loader of uint8 batches. Its own generator keeps it from drawing on the global RNG (dropout's),
    which would make a run resumed mid-epoch draw different dropout masks."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=pin,
        persistent_workers=cfg.num_workers > 0,
        drop_last=False,
        generator=torch.Generator(),
    )
