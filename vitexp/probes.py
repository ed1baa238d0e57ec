"""Probes: a classifier fitted on a model's embeddings, as seed 001's "accuracy (svc)" measures how much of the
classes the learned representation holds, apart from the network's own classifier.

The `probe` group's options are registered in `PROBES` (`none`, `svc`: scikit-learn's `SVC` with default
parameters, `linear`: logistic regression), each a builder of an unfitted scikit-learn estimator. The
embedding is what the classifier reads (`vitexp.models.embed`: the code layer's output when the model has
one). `vitexp.probing` runs them during training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from vitexp.config import ProbeConfig
from vitexp.models import embed
from vitexp.registry import Registry

PROBES: Registry[Any] = Registry("probe")


@PROBES.register("none", ProbeConfig)
def no_probe(cfg: ProbeConfig) -> None:
    return None


@PROBES.register("svc", ProbeConfig)
def svc(cfg: ProbeConfig) -> Any:
    from sklearn.svm import SVC

    return SVC()


@PROBES.register("linear", ProbeConfig)
def logistic_regression(cfg: ProbeConfig) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000)


@torch.inference_mode()
def embeddings(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings (float32) and labels of every image of `batches`, with the model in eval mode."""
    model.eval()
    features, labels = [], []
    for images, batch_labels in batches:
        with autocast():
            features.append(embed(model, prepare(images.to(device, non_blocking=True))).float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def probe_accuracy(estimator: Any, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Fit `estimator` on the `train` embeddings and labels; its accuracy on `test`'s."""
    estimator.fit(*train)
    return float(estimator.score(*test))
