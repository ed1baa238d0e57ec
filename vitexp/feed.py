"""How batches reach the training loop: in a seeded order that resumes mid-epoch, from tensors on the
device (one indexing op per batch) or through DataLoaders (per-image policies, data that does not fit).

A split that is the same dataset as another (`val` is `test` with `data.val_fraction=0`) is counted and
moved to the device once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torchvision.transforms import v2

from vitexp.config import ConfigError, DataConfig
from vitexp.device import free_memory, to_device_async
from vitexp.splits import Splits

log = logging.getLogger("vitexp")

SPLITS = ("train", "val", "test")
DEVICE_MEMORY_SHARE = 0.3  # auto keeps data on the GPU only while it takes at most this share of free memory


class EpochOrder(Sampler[int]):
    """The training order of one epoch, a pure function of (seed, epoch), optionally from a batch offset.

    Deriving the order instead of drawing it from a stateful generator means a resumed run needs only
    (epoch, batch) to continue exactly where the interrupted one stopped. Only full batches are served.
    With several ranks, `batch_size` is the global batch and each rank serves its own slice of every batch
    (`local_batch` images), so the ranks together train exactly the batches one process would.
    """

    def __init__(
        self, size: int, batch_size: int, batches_per_epoch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.batch_size, self.batches_per_epoch, self.seed = size, batch_size, batches_per_epoch, seed
        self.rank, self.local_batch = rank, local_batch_size(batch_size, world_size)
        self.epoch, self.start_batch, self.stop_batch = 0, 0, batches_per_epoch

    def set_position(self, epoch: int, start_batch: int = 0, stop_batch: int | None = None) -> None:
        """Serve batches [start_batch, stop_batch) of `epoch` (by default, to the end of the epoch)."""
        self.epoch, self.start_batch = epoch, start_batch
        self.stop_batch = self.batches_per_epoch if stop_batch is None else min(stop_batch, self.batches_per_epoch)

    def indices(self) -> torch.Tensor:
        """The sample indices still to train on in this epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        served = order[self.start_batch * self.batch_size : self.stop_batch * self.batch_size]
        if self.local_batch == self.batch_size:
            return served
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return served.view(-1, self.batch_size)[:, mine].reshape(-1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return (self.stop_batch - self.start_batch) * self.local_batch


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share of the global `data.batch_size`; equal shares, so DDP's mean of the ranks' mean
    gradients is the mean over the global batch, as one process computes it."""
    if batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must divide evenly among the {world_size} "
            f"processes (world size {world_size}): use a multiple of {world_size}"
        )
    return batch_size // world_size


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
        indices = to_device_async(indices, self.images.device)  # once an epoch; on a GPU without waiting for it
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


def keep_on_device(data: DataConfig, splits: Splits, free_bytes: int | None) -> bool:
    """Whether the splits live on the training device (batches by indexing) instead of behind a DataLoader.

    `auto` keeps them there unless they would take more than `DEVICE_MEMORY_SHARE` of the device's free
    memory (`free_bytes`; None for the CPU, where they already are).
    """
    mode = data.on_device.lower()
    in_memory = all(isinstance(getattr(splits, name), TensorDataset) for name in SPLITS)
    if mode == "false" or data.policy != "none":
        return False
    if not in_memory:
        if mode == "true":
            raise ConfigError("data.on_device=true is not allowed with data.cache=false: the images are not in memory")
        return False
    if mode == "true" or free_bytes is None:
        return True
    datasets = {id(dataset): dataset for dataset in (getattr(splits, name) for name in SPLITS)}.values()
    size = sum(t.nelement() * t.element_size() for dataset in datasets for t in dataset.tensors)
    if size > DEVICE_MEMORY_SHARE * free_bytes:
        log.info(
            "data (%.1f GB) stays in host memory: more than %d%% of free GPU memory",
            size / 1e9,
            DEVICE_MEMORY_SHARE * 100,
        )
        return False
    return True


class Feed:
    """A run's batches: the train split in the epoch's seeded order (resumable mid-epoch), val and test in
    storage order; from tensors on the training device when they fit, through DataLoaders otherwise."""

    def __init__(
        self,
        splits: Splits,
        data: DataConfig,
        device: torch.device,
        batches_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.splits, self.pin = data, splits, device.type == "cuda"
        self.rank, self.world_size = rank, world_size
        self.order = EpochOrder(len(splits.train), data.batch_size, batches_per_epoch, seed, rank, world_size)
        self.resident = keep_on_device(data, splits, free_memory(device))
        if self.resident:
            moved: dict[int, DeviceData] = {}  # by dataset: val and test may be one dataset, moved once
            self.device_data = {}
            for name in SPLITS:
                dataset = getattr(splits, name)
                if id(dataset) not in moved:
                    moved[id(dataset)] = DeviceData(dataset, device)
                self.device_data[name] = moved[id(dataset)]
            return
        pin = self.pin
        train, sampler = splits.train, self.order
        if data.policy != "none":
            train, sampler = PolicyImages(train, data.policy, data.name), SampleSeeds(self.order)
        self.loaders = {
            "train": make_loader(train, self.order.local_batch, data, sampler, pin),
            "val": make_loader(splits.val, data.eval_batch_size, data, None, pin),
            "test": make_loader(splits.test, data.eval_batch_size, data, None, pin),
        }

    def train(
        self, epoch: int, start_batch: int, stop_batch: int | None = None
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from `start_batch` on (up to `stop_batch`), in the epoch's seeded order."""
        self.order.set_position(epoch, start_batch, stop_batch)
        if self.resident:
            return self.device_data["train"].batches(self.order.local_batch, self.order.indices())
        return self.loaders["train"]

    def eval_shard(self, split: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous share of `val` or `test` (all of it for one process); the ranks' metrics are
        reduced by torchmetrics, so together they evaluate every image once."""
        if self.world_size == 1:
            return self.eval(split)
        size = len(getattr(self.splits, split))
        start, stop = size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size
        return self.eval(split, torch.arange(start, stop))

    def eval(self, split: str, indices: torch.Tensor | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `val`, `test` or `train` (its images as evaluation sees them: for BatchNorm statistics
        and probes) in storage order, or only the images at `indices`."""
        if self.resident:
            return self.device_data[split].batches(self.data.eval_batch_size, indices)
        if indices is None and split in ("val", "test"):
            return self.loaders[split]
        dataset = getattr(self.splits, split)
        subset = dataset if indices is None else Subset(dataset, indices.tolist())
        return make_loader(subset, self.data.eval_batch_size, self.data, None, self.pin)
