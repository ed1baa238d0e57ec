"""Evaluation (`evaluate` any weights, torchmetrics), the on-device running means of the training loop, and its
data wait."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def eval_metrics(num_classes: int) -> MetricCollection:
    """Top-1/top-5 accuracy, macro precision/recall/F1, ECE (15 bins), NLL and mean confidence.

    Macro averages skip classes absent from both predictions and labels, so a partial dataset is not
    penalised for classes it does not contain. `validate_args=False` keeps updates free of GPU syncs.
    """
    common = {"num_classes": num_classes, "validate_args": False}
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(top_k=1, average="micro", **common),
            "acc5": MulticlassAccuracy(top_k=min(5, num_classes), average="micro", **common),
            "precision": MulticlassPrecision(average="macro", **common),
            "recall": MulticlassRecall(average="macro", **common),
            "f1": MulticlassF1Score(average="macro", **common),
            "ece": MulticlassCalibrationError(n_bins=15, norm="l1", **common),
        }
    )


class EvalMeter:
    """Accumulates logits/labels of an evaluation pass; `compute` returns plain floats."""

    def __init__(self, num_classes: int, device: torch.device, l2: bool = False) -> None:
        self.metrics = eval_metrics(num_classes).to(device)
        self.nll = MeanMetric().to(device)
        self.confidence = MeanMetric().to(device)
        self.l2 = MeanMetric().to(device) if l2 else None
        self.num_classes = num_classes

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        self.metrics.update(probs, labels)
        self.nll.update(F.cross_entropy(logits, labels, reduction="none"))
        self.confidence.update(probs.max(dim=-1).values)
        if self.l2 is not None:  # the `loss=l2` of training, against the one-hot label
            one_hot = F.one_hot(labels, self.num_classes).float()
            self.l2.update(F.mse_loss(logits, one_hot, reduction="none").mean(dim=-1))

    def compute(self) -> dict[str, float]:
        """Every metric as a float, read from the device in one transfer."""
        values = self.metrics.compute()
        values["loss"] = self.nll.compute()  # plain CE on hard labels: comparable across smoothing
        values["confidence"] = self.confidence.compute()
        if self.l2 is not None:
            values["l2"] = self.l2.compute()
        numbers = torch.stack([value.float() for value in values.values()]).tolist()
        return dict(zip(values, numbers, strict=True))


class RunningMeans:
    """Sums kept on the device so the training loop never waits for the GPU to read a number.

    `reduce` sums them over the ranks of a run on several processes (each rank counts its own slice), when
    they are read or checkpointed; a checkpoint holds the run's sums, which a resumed rank 0 continues alone.
    """

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.device, self.reduce = device, reduce
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss*n, correct, n

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a batch; accuracy is against the dominant class of the (possibly mixed) target. Skipped if not finite."""
        n = logits.shape[0] * finite.double()
        correct = (logits.argmax(-1) == targets.argmax(-1)).sum() * finite
        self.sums[0] += torch.where(finite, loss.detach().double(), 0.0) * n
        self.sums[1] += correct
        self.sums[2] += n

    def compute(self, step_loss: torch.Tensor | None = None) -> dict[str, float]:
        """The means so far; with `step_loss`, also its value (`step_loss`), read in the same transfer."""
        sums = self.reduce(self.sums)
        if step_loss is not None:  # this rank's own
            sums = torch.cat([sums, step_loss.detach().double().reshape(1)])
        loss_sum, correct, n, *step = sums.tolist()
        return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)} | ({"step_loss": step[0]} if step else {})

    def state_dict(self) -> dict:
        return {"sums": self.reduce(self.sums).cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)


Batch = TypeVar("Batch")


class DataWait:
    """Host seconds the training loop spent blocked on its next batch (DataLoader workers, or indexing).

    Wall-clock only, no device sync, so it costs nothing per step. Divided by the epoch's wall time it is
    the share of the epoch the loop starved for data: near 0 when compute is the limit, as it should be.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                return
            yield batch


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    l2: bool = False,
) -> dict[str, float]:
    """Classification metrics of `model` over `batches` (`prepare` turns raw images into its inputs), and
    with `l2` the mean squared error of the logits against the one-hot labels.

    Any weights evaluate the same way: the trained ones, or a copy such as an average of them. Runs
    without autograd, so no activations are kept and validation never needs more memory than training.
    """
    model.eval()
    meter = EvalMeter(num_classes, device, l2)
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(prepare(images))
        meter.update(logits, labels)
    return meter.compute()
