"""Oxford-IIIT Pet: downloaded safely, checked, decoded once into a uint8 cache, split per breed.

The tree comes through torchvision's `OxfordIIITPet`. A download goes into a temporary directory and is
swapped in only when complete, so a failed one never costs a user the copy they have. Every image is
decoded once into a cache keyed by everything that shapes its pixels, the resize included: with
`data.crop=squash` an image is squashed whole to a square (aspect ratio ignored) instead of resized and
center-cropped, so the two modes keep separate caches and neither is ever read for the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import OxfordIIITPet
from torchvision.transforms import v2
from tqdm import tqdm

from vitexp.checkpoint import atomic_write
from vitexp.config import DataConfig
from vitexp.splits import (
    DataError,
    Splits,
    cache_dir_of,
    locked,
    make_splits,
    not_writable,
    require_root,
    split_tensors,
    stratified_split,
)

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


def to_uint8_square(size: int, squash: bool = False) -> v2.Compose:
    """PIL image -> uint8 (3, size, size): shorter side resized to `size`, then center-cropped; with `squash`
    the whole image resized to size x size, its aspect ratio ignored (nothing cropped)."""
    if squash:
        return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)])
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

    def __init__(self, root: Path, split: str, size: int, squash: bool = False) -> None:
        pets_listing(root / "oxford-iiit-pet", split)  # a clear error before torchvision's parser sees it
        self.pets = OxfordIIITPet(root, split=split, transform=to_uint8_square(size, squash))
        self.size, self.squash = size, squash

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


def _incomplete(base: Path, missing: list[Path]) -> str:
    if missing == [base]:
        return f"Oxford-IIIT Pet is not at {base}"
    return f"Oxford-IIIT Pet at {base} is incomplete: {len(missing)} files missing, e.g. {missing[0]}"


def _mark_complete(base: Path) -> None:
    try:
        (base / PETS_COMPLETE_MARKER).write_text("ok\n")
    except OSError as err:
        raise not_writable(base, err) from err


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
    with contextlib.nullcontext() if holding_root_lock else locked(root / PETS_LOCK):
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
    require_root(root, download)
    base = root / "oxford-iiit-pet"
    with locked((cache_dir or root) / PETS_LOCK):
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
    stem = f"{key['split']}-{key['size']}px" + (f"-{key['resize']}" if "resize" in key else "")
    path = cache_dir / f"{stem}-{digest}.pt"
    with locked(path.with_name(path.name + ".lock")):
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
        for stale in cache_dir.glob(f"{stem}-{'?' * len(digest)}.pt") if prune else ():  # this resize's only
            if stale != path:  # its images or listing changed since: it will never be read again
                stale.unlink(missing_ok=True)
                log.info("removed the outdated cache %s", stale)
        return data


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
    """Everything that shapes a split's cached pixels and labels: size, resize, decoding, listing, each image file.

    The default resize (shorter side, center crop) adds no `resize` entry, so caches made before `squash`
    existed keep their keys and stay valid.
    """
    listing = (base / "annotations" / f"{split}.txt").read_bytes()
    key = {
        "dataset": "pets",
        "split": split,
        "size": images.size,
        "version": CACHE_VERSION,
        "listing": hashlib.sha256(listing).hexdigest(),
        "files": _files_digest(images.files),
    }
    return key | ({"resize": "squash"} if images.squash else {})


def load_pets(cfg: DataConfig) -> Splits:
    root = Path(cfg.root).expanduser()
    base = prepare_pets(root, cfg.download, cache_dir_of(cfg))
    squash = cfg.crop == "squash"
    trainval, test = (PetsImages(root, split, cfg.stored_size, squash) for split in ("trainval", "test"))
    train_idx, val_idx = stratified_split(trainval.labels, cfg.val_fraction, cfg.split_seed)
    if not cfg.cache:
        train, val = torch.utils.data.Subset(trainval, train_idx), torch.utils.data.Subset(trainval, val_idx)
        return make_splits(cfg, train, val, test, num_classes=len(PETS_CLASSES), class_names=PETS_CLASSES)
    own_cache = cache_dir_of(cfg) is None  # data.cache_dir may serve several copies of the dataset: never pruned
    cache_dir = cache_dir_of(cfg) or base / ".vitexp-cache"
    trainval_data = cached(trainval, cache_dir, _pets_cache_key(base, "trainval", trainval), cfg.num_workers, own_cache)
    test_data = cached(test, cache_dir, _pets_cache_key(base, "test", test), cfg.num_workers, own_cache)
    train, val = split_tensors(trainval_data, train_idx), split_tensors(trainval_data, val_idx)
    return make_splits(cfg, train, val, test_data, num_classes=len(PETS_CLASSES), class_names=PETS_CLASSES)
