"""What every dataset loader returns and shares: the three uint8 splits, a stratified split, the size the
images are stored at, and the locked, never-created-by-accident dataset root.

`data.val_fraction=0` holds nothing out: the test split then doubles as the validation split, and
`Splits.selected_on_test` says so, so that results selected on the test split are never mistaken for
results selected on a held-out one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from filelock import FileLock
from torch.utils.data import Dataset, Subset, TensorDataset

from vitexp.config import DataConfig

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The dataset on disk is missing, incomplete or holds an unreadable file (named in the message)."""


@dataclass
class Splits:
    """The three splits as datasets of `(uint8 (3, S, S) image, int label)` plus the label space.

    `selected_on_test` is True when there is no held-out validation split (`data.val_fraction=0`): `val`
    is then the very `test` dataset, and the best epoch is chosen on the test split.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: Sequence[str]
    selected_on_test: bool = False


def make_splits(
    cfg: DataConfig, train: Dataset, val: Dataset, test: Dataset, num_classes: int, class_names: Sequence[str]
) -> Splits:
    """The splits a loader made; with `data.val_fraction=0` the (empty) `val` is replaced by `test`."""
    if cfg.val_fraction == 0:
        return Splits(train, test, test, num_classes, class_names, selected_on_test=True)
    return Splits(train, val, test, num_classes, class_names)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices so each class keeps `val_fraction` of its samples in val (rounded), seeded; 0: val is empty.

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


def require_root(root: Path, download: bool) -> None:
    """With data.download=false nothing is created: a mistyped data.root must not become an empty directory."""
    if not download and not root.exists():
        raise DataError(
            f"data.root {root} does not exist (point data.root at the directory that holds the dataset, "
            "or set data.download=true to download it there)"
        )


def not_writable(place: Path, err: OSError) -> DataError:
    return DataError(
        f"cannot write to {place} ({err.strerror or err}): set data.cache_dir to a writable directory "
        "for the cache and lock files"
    )


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold a file lock; a place where it cannot be created is an error that says where to put it instead."""
    lock = FileLock(str(lock_path))
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:
        raise not_writable(lock_path.parent, err) from err
    try:
        yield
    finally:
        lock.release()


def split_tensors(data: TensorDataset, idx: list[int]) -> TensorDataset:
    return TensorDataset(*(t[idx] for t in data.tensors))


def cache_dir_of(cfg: DataConfig) -> Path | None:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None


def limit_splits(splits: Splits, cfg: DataConfig) -> Splits:
    """`data.limit_batches`: a seeded `limit_batches` x batch size images of each split (debug runs check a config
    end to end in seconds, or overfit a few batches). Tensor datasets stay tensor datasets (they may go on the GPU)."""
    if cfg.limit_batches is None:
        return splits
    rng = np.random.default_rng(cfg.split_seed)

    def cut(dataset: Dataset, batch_size: int) -> Dataset:
        size = len(dataset)  # type: ignore[arg-type]
        keep = np.sort(rng.permutation(size)[: cfg.limit_batches * batch_size]).tolist()
        if isinstance(dataset, TensorDataset):
            return TensorDataset(*(tensor[keep] for tensor in dataset.tensors))
        return Subset(dataset, keep)

    val = cut(splits.val, cfg.eval_batch_size)
    test = val if splits.selected_on_test else cut(splits.test, cfg.eval_batch_size)
    return replace(splits, train=cut(splits.train, cfg.batch_size), val=val, test=test)
