"""The probe during training (`probe=svc|linear`), an `engine.Hook`: every `probe.every` epochs it embeds a
seeded subsample of the training images and the validation split, fits the probe and adds `val/acc_svc`
(`val/acc_linear`) to the epoch's row; at the end the same on the test split with the tested weights
(`test.acc_svc` in results.json), next to the classifier's own (argmax) accuracy.

Training images are embedded as evaluation sees them (no augmentation), and the subsample is drawn from its
own generator, so probing never changes what trains: a probed run's weights equal an unprobed run's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vitexp.config import Config, ProbeConfig
from vitexp.engine import Hook, Trainer
from vitexp.probes import PROBES, embeddings, probe_accuracy


class Probe(Hook):
    def __init__(self, cfg: ProbeConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.key = f"acc_{cfg.name}"

    def train_indices(self, trainer: Trainer) -> torch.Tensor:
        """At most `max_train` training images, the same ones every time (seeded by the run's seed)."""
        size = len(trainer.splits.train)
        chosen = np.random.default_rng(self.seed).permutation(size)[: self.cfg.max_train]
        return torch.as_tensor(np.sort(chosen))

    def accuracy(self, trainer: Trainer, model: torch.nn.Module, split: str) -> float:
        def embedded(batches: Any) -> tuple[np.ndarray, np.ndarray]:
            return embeddings(model, batches, trainer.prepare_eval, trainer.device, trainer.autocast)

        train = embedded(trainer.feed.eval("train", self.train_indices(trainer)))
        return probe_accuracy(PROBES.build(self.cfg), train, embedded(trainer.feed.eval(split)))

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if row["epoch"] % self.cfg.every == 0 or row["epoch"] == trainer.epochs:
            row[f"val/{self.key}"] = self.accuracy(trainer, trainer.evaluated_model()[1], "val")

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        results["test"][self.key] = self.accuracy(trainer, trainer.evaluated_model()[1], "test")


def probe_hooks(cfg: Config) -> list[Hook]:
    """The probe, if the config chooses one."""
    return [] if cfg.probe.name == "none" else [Probe(cfg.probe, cfg.seed)]
