"""Every config group's registry, and the schemas Hydra composes `conf/` against.

Importing this module imports every group module, which registers its options: a new group is one
more line in `REGISTRIES`, a new logger sink module one more name in the import line.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from vitexp import (  # noqa: F401 (they register)
    augment,
    data,
    logger,
    models,
    optim,
    probes,
    resnet_attn,
    tensorboard_logger,
    wandb_logger,
)
from vitexp.config import Config
from vitexp.registry import Registry

REGISTRIES: tuple[Registry, ...] = (
    models.MODELS,
    augment.AUGMENTATIONS,
    data.DATASETS,
    optim.OPTIMIZERS,
    optim.SCHEDULES,
    logger.LOGGERS,
    probes.PROBES,
)


def register_schemas() -> None:
    """Store the schemas so `conf/<group>/<option>.yaml` can extend them (`/schema/<group>/<option>@_here_`)."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for registry in REGISTRIES:
        for option in registry:
            store.store(group=f"schema/{registry.group}", name=option.name, node=option.schema)
