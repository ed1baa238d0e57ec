"""How batches reach the training loop: in a seeded order that resumes mid-epoch, from tensors on the
device (one indexing op per batch) or through DataLoaders (per-image policies, data that does not fit).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torchvision.transforms import v2

from vitexp.config import DataConfig


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
