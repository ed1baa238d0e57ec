"""Datasets as uint8 image tensors of one stored size, split into train/val/test.

Images become `uint8 (3, S, S)` tensors as early as possible (decode, shorter side resized to S, center
crop); every random transform and the normalisation run later, batched, on the training device
(`vitexp.augment`). So the CPU side is deterministic: a batch depends only on which indices it holds,
which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.datasets import OxfordIIITPet
from torchvision.transforms import v2
from tqdm import tqdm

from vitexp.checkpoint import atomic_write
from vitexp.config import DataConfig
from vitexp.registry import Registry

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
PETS_LOCK = ".oxford-iiit-pet.lock"


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


DATASETS: Registry[Splits] = Registry("data")  # every dataset option shares DataConfig; a loader each


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


PETS_LINE = "'<image> <class 1-37> <species> <breed id>'"


def pets_listing(base: Path, split: str) -> list[str]:
    """The image names `annotations/<split>.txt` lists, every line checked first.

    torchvision's parser fails on a blank or malformed line with a bare ValueError that names neither
    the file nor the line, and it accepts class ids outside the 37 breeds.
    """
    path = base / "annotations" / f"{split}.txt"
    names = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not (
            len(fields) == 4
            and all(field.isdecimal() for field in fields[1:])
            and 1 <= int(fields[1]) <= len(PETS_CLASSES)
        ):
            raise DataError(f"{path} line {number}: expected {PETS_LINE}, got {line!r}")
        names.append(fields[0])
    return names


class PetsImages(Dataset):
    """torchvision's OxfordIIITPet yielding uint8 squares; a file that cannot be decoded is named in the error."""

    def __init__(self, root: Path, split: str, size: int) -> None:
        pets_listing(root / "oxford-iiit-pet", split)  # a clear error before torchvision's parser sees it
        self.pets = OxfordIIITPet(root, split=split, transform=to_uint8_square(size))
        self.size = size

    @property
    def labels(self) -> list[int]:
        return self.pets._labels

    @property
    def files(self) -> list[Path]:
        return self.pets._images

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
        images = (base / "images" / f"{name}.jpg" for name in pets_listing(base, split))
        missing += [image for image in images if not image.is_file()]
    return missing


def _require_root(root: Path, download: bool) -> None:
    """With data.download=false nothing is created: a mistyped data.root must not become an empty directory."""
    if not download and not root.exists():
        raise DataError(
            f"data.root {root} does not exist (point data.root at the directory that holds the dataset, "
            "or set data.download=true to download it there)"
        )


def _not_writable(place: Path, err: OSError) -> DataError:
    return DataError(
        f"cannot write to {place} ({err.strerror or err}): set data.cache_dir to a writable directory "
        "for the cache and lock files"
    )


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold a file lock; a place where it cannot be created is an error that says where to put it instead."""
    lock = FileLock(str(lock_path))
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:
        raise _not_writable(lock_path.parent, err) from err
    try:
        yield
    finally:
        lock.release()


def _incomplete(base: Path, missing: list[Path]) -> str:
    if missing == [base]:
        return f"Oxford-IIIT Pet is not at {base}"
    return f"Oxford-IIIT Pet at {base} is incomplete: {len(missing)} files missing, e.g. {missing[0]}"


def _mark_complete(base: Path) -> None:
    try:
        (base / PETS_COMPLETE_MARKER).write_text("ok\n")
    except OSError as err:
        raise _not_writable(base, err) from err


def _swap_in(fresh: Path, base: Path, aside: Path) -> None:
    """Replace `base` by `fresh` with renames: at every moment the old tree or the new one is in place
    (under its own name, or as `aside` until `_clear_leftovers` puts it back), and only then remove the old one."""
    if os.path.lexists(base):
        base.rename(aside)
    try:
        fresh.rename(base)
    except OSError:
        if os.path.lexists(aside):
            aside.rename(base)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _clear_leftovers(root: Path, base: Path) -> None:
    """What killed downloads left next to `base` (the caller holds the download lock, so none is running):
    partial downloads are removed, and an old tree set aside by an interrupted swap is put back."""
    for staging in root.glob(".oxford-iiit-pet.download-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for aside in root.glob(".oxford-iiit-pet.previous-*"):
        if os.path.lexists(base):  # the swap completed: this is the replaced tree
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(base)


def _download_pets(root: Path, base: Path, holding_root_lock: bool) -> None:
    """Download into a temp dir next to `base` (same filesystem), verify it there, then swap it in.

    Whatever fails (no network, HTTP error, corrupt archive, files missing after extraction, a kill), the
    existing tree stays as it was. The download lock is always the one in `root`, whatever `data.cache_dir`
    says, since the temp dirs are there.
    """
    with contextlib.nullcontext() if holding_root_lock else _locked(root / PETS_LOCK):
        _clear_leftovers(root, base)
        missing = _missing_pets_files(base) if base.is_dir() else [base]
        if not missing:  # another job (with another data.cache_dir) has just downloaded it
            return
        if base.exists():
            log.warning("Pets tree at %s is incomplete (%d files missing); downloading it again", base, len(missing))
        staging = root / f".oxford-iiit-pet.download-{os.getpid()}"
        try:
            OxfordIIITPet(staging, split="trainval", download=True)
            fresh = staging / "oxford-iiit-pet"
            if lacking := _missing_pets_files(fresh):
                raise DataError(f"the downloaded archives lack {len(lacking)} files, e.g. {lacking[0].name}")
            (fresh / PETS_COMPLETE_MARKER).write_text("ok\n")
            _swap_in(fresh, base, root / f".oxford-iiit-pet.previous-{os.getpid()}")
        except Exception as err:
            kept = "the files there were left as they were" if base.exists() else "nothing was left behind"
            raise DataError(
                f"{_incomplete(base, missing)}; downloading it failed: {str(err) or repr(err)} ({kept})"
            ) from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def prepare_pets(root: Path, download: bool, cache_dir: Path | None = None) -> Path:
    """Make sure a complete Pets tree is under `root`, downloading it at most once across processes.

    Concurrent jobs of a sweep share `root`: a file lock serialises the download, and a marker written
    after the tree checks out tells a complete tree from one a killed job left half-extracted. With a
    `cache_dir` the lock lives there and nothing is written into a complete tree, so a shared read-only
    copy works (its files are checked instead of the marker).
    """
    _require_root(root, download)
    base = root / "oxford-iiit-pet"
    with _locked((cache_dir or root) / PETS_LOCK):
        if cache_dir is None:  # holding the root's lock: no download runs, anything left over is from a killed one
            _clear_leftovers(root, base)
        if (base / PETS_COMPLETE_MARKER).is_file():
            return base
        missing = _missing_pets_files(base) if base.is_dir() else [base]
        if missing and not download:
            raise DataError(f"{_incomplete(base, missing)} (set data.download=true to download it)")
        if missing:
            _download_pets(root, base, holding_root_lock=cache_dir is None)
        elif cache_dir is None:
            _mark_complete(base)
    return base


CACHE_VERSION = 1  # bump when the decoding changes, so no stale cache is ever read


def decode_all(dataset: Dataset, num_workers: int, what: str) -> TensorDataset:
    """Decode every image once (DataLoader workers) into one uint8 tensor."""
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, generator=torch.Generator())
    images, labels = [], []
    for batch_images, batch_labels in tqdm(loader, desc=f"decoding {what}", disable=not sys.stderr.isatty()):
        images.append(batch_images)
        labels.append(batch_labels)
    return TensorDataset(torch.cat(images), torch.cat(labels).long())


def cached(
    dataset: Dataset, cache_dir: Path, key: dict[str, Any], num_workers: int, prune: bool = False
) -> TensorDataset:
    """`dataset` as uint8 tensors, decoded once into a cache file keyed by everything that shapes the pixels.

    Jobs starting together wait on a file lock while the first one decodes; a cache that does not
    match its key, its length or its dtype is rebuilt, never used. With `prune` (a cache directory that
    belongs to this dataset alone), a new cache replaces the older ones of the same split and size.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{key['split']}-{key['size']}px-{digest}.pt"
    with _locked(path.with_name(path.name + ".lock")):
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                images, labels = state["images"], state["labels"]
                if state["key"] == key and images.dtype == torch.uint8 and len(images) == len(labels) == len(dataset):
                    return TensorDataset(images, labels)
                log.warning("cache %s does not match its dataset; rebuilding it", path)
            except Exception as err:  # a truncated or foreign file
                log.warning("cache %s is unreadable (%s); rebuilding it", path, err)
        data = decode_all(dataset, num_workers, f"{key['dataset']} {key['split']}")
        images, labels = data.tensors
        atomic_write(path, lambda file: torch.save({"key": key, "images": images, "labels": labels}, file))
        log.info("cached %d images of %s %s in %s", len(images), key["dataset"], key["split"], path)
        for stale in cache_dir.glob(f"{key['split']}-{key['size']}px-*.pt") if prune else ():
            if stale != path:  # its images or listing changed since: it will never be read again
                stale.unlink(missing_ok=True)
                log.info("removed the outdated cache %s", stale)
        return data


def split_tensors(data: TensorDataset, idx: list[int]) -> TensorDataset:
    return TensorDataset(*(t[idx] for t in data.tensors))


def _files_digest(files: list[Path]) -> str:
    """Size and mtime of every image: a replaced image changes the cache key, its name alone does not."""
    digest = hashlib.sha256()
    for file in files:
        try:
            stat = file.stat()
        except OSError as err:
            raise DataError(f"cannot read image {file}: {err}") from err
        digest.update(f"{file.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _pets_cache_key(base: Path, split: str, images: PetsImages) -> dict[str, Any]:
    """Everything that shapes a split's cached pixels and labels: size, decoding, listing, each image file."""
    listing = (base / "annotations" / f"{split}.txt").read_bytes()
    return {
        "dataset": "pets",
        "split": split,
        "size": images.size,
        "version": CACHE_VERSION,
        "listing": hashlib.sha256(listing).hexdigest(),
        "files": _files_digest(images.files),
    }


def _cache_dir(cfg: DataConfig) -> Path | None:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None


@DATASETS.register("pets", DataConfig)
def load_pets(cfg: DataConfig) -> Splits:
    root = Path(cfg.root).expanduser()
    base = prepare_pets(root, cfg.download, _cache_dir(cfg))
    trainval, test = (PetsImages(root, split, cfg.stored_size) for split in ("trainval", "test"))
    train_idx, val_idx = stratified_split(trainval.labels, cfg.val_fraction, cfg.split_seed)
    if not cfg.cache:
        train, val = torch.utils.data.Subset(trainval, train_idx), torch.utils.data.Subset(trainval, val_idx)
        return Splits(train, val, test, num_classes=len(PETS_CLASSES), class_names=PETS_CLASSES)
    own_cache = _cache_dir(cfg) is None  # data.cache_dir may serve several copies of the dataset: never pruned
    cache_dir = _cache_dir(cfg) or base / ".vitexp-cache"
    trainval_data = cached(trainval, cache_dir, _pets_cache_key(base, "trainval", trainval), cfg.num_workers, own_cache)
    test_data = cached(test, cache_dir, _pets_cache_key(base, "test", test), cfg.num_workers, own_cache)
    train, val = split_tensors(trainval_data, train_idx), split_tensors(trainval_data, val_idx)
    return Splits(train, val, test_data, num_classes=len(PETS_CLASSES), class_names=PETS_CLASSES)


def to_stored(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W[, C]) arrays as uint8 (N, 3, size, size), resized only when the size differs."""
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
    _require_root(root, cfg.download)
    with _locked((_cache_dir(cfg) or root) / f".{cfg.name}.lock"):  # one download for a whole sweep
        splits = [dataset_class(str(root), train=train, download=cfg.download) for train in (True, False)]
    tensors = []
    for split in splits:
        images = torch.as_tensor(np.asarray(split.data))
        tensors.append(TensorDataset(to_stored(images, cfg.stored_size), torch.as_tensor(split.targets).long()))
    train_idx, val_idx = stratified_split(tensors[0].tensors[1].tolist(), cfg.val_fraction, cfg.split_seed)
    classes = list(splits[0].classes)
    return Splits(
        split_tensors(tensors[0], train_idx),
        split_tensors(tensors[0], val_idx),
        tensors[1],
        num_classes=len(classes),
        class_names=classes,
    )


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
    return Splits(make(SYNTHETIC_IMAGES - n_val), make(n_val), make(1024), SYNTHETIC_CLASSES, names)


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
    return Splits(subset(train_idx), subset(val_idx), subset(test_idx), num_classes=10, class_names=names)


def build_splits(cfg: DataConfig) -> Splits:
    """The registered dataset `cfg.name`, as its three splits."""
    return DATASETS.build(cfg)


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

    def indices(self) -> torch.Tensor:
        """The sample indices still to train on in this epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return order[self.start_batch * self.batch_size : self.batches_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class DeviceData:
    """A split held as uint8 tensors on the training device: a batch is one indexing op, no DataLoader."""

    def __init__(self, dataset: TensorDataset, device: torch.device) -> None:
        self.images, self.labels = (tensor.to(device) for tensor in dataset.tensors)
        if device.type == "cpu":  # the layout the CPU's per-image resize reads (see augment.crop_flip_resize)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
            dataset.tensors = (self.images, self.labels)  # one copy in memory, not two

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, indices: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `indices` order (a whole epoch's permutation), or in storage order for evaluation."""
        if indices is None:
            for start in range(0, len(self), batch_size):
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            return
        indices = indices.to(self.images.device)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            yield self.take(batch), self.labels.index_select(0, batch)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """`images[index]` in the stored layout; channels_last is gathered as whole NHWC images (a memcpy each)."""
        if self.images.is_contiguous():
            return self.images.index_select(0, index)
        return self.images.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)


POLICY_TRANSFORMS = {  # by the names of config.POLICIES
    "autoaugment": lambda name: v2.AutoAugment(
        v2.AutoAugmentPolicy.CIFAR10 if name == "cifar10" else v2.AutoAugmentPolicy.IMAGENET
    ),
    "trivialaugment": lambda name: v2.TrivialAugmentWide(),
    "randaugment": lambda name: v2.RandAugment(),
}


class PolicyImages(Dataset):
    """A per-image augmentation policy (AutoAugment & co.) run on uint8 images in the DataLoader workers.

    Items are `(index, seed)` pairs from `SampleSeeds`: each image's random policy is drawn from its own
    seed, so the result does not depend on which worker runs it, how many there are, or where a resumed
    run starts, and the workers can stay up from one epoch to the next.
    """

    def __init__(self, dataset: Dataset, policy: str, dataset_name: str) -> None:
        self.dataset, self.transform = dataset, POLICY_TRANSFORMS[policy](dataset_name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # torchvision's policies draw from the global RNG
            torch.manual_seed(seed)
            return self.transform(image), label


class SampleSeeds(Sampler[tuple[int, int]]):
    """An `EpochOrder`'s indices, each paired with a seed that is a function of (run seed, epoch, index)."""

    def __init__(self, order: EpochOrder) -> None:
        self.order = order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.order.seed * 100_003 + self.order.epoch) * 10_000_019
        return ((index, (base + index) % 2**63) for index in self.order.indices().tolist())

    def __len__(self) -> int:
        return len(self.order)


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
