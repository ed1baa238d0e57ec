"""Where vitexp's files live, whatever directory a command is started in.

A checkout (cloned, or installed with `pip install -e .`) reads its config from `<checkout>/conf` and keeps
datasets and outputs beside it, where they always were; an installed wheel carries its config inside the
package and keeps datasets and outputs under `~/vitexp`. A cluster sets `VITEXP_DATA` (the datasets) and
`VITEXP_OUTPUTS` (the directory holding `outputs/` and `multirun/`) once, for every job.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "conf" / "config.yaml").is_file() else None
CONF_DIR = CHECKOUT / "conf" if CHECKOUT is not None else PACKAGE / "conf"  # train.py's config directory
BASE = CHECKOUT if CHECKOUT is not None else Path.home() / "vitexp"  # datasets and outputs by default

DATA_ENV, OUTPUTS_ENV = "VITEXP_DATA", "VITEXP_OUTPUTS"


def data_root() -> str:
    """`data.root`'s default: `$VITEXP_DATA`, else `data/` in the checkout (or in ~/vitexp)."""
    return os.environ.get(DATA_ENV) or str(BASE / "data")


def outputs_root() -> str:
    """Where `outputs/<date>/<time>` and `multirun/<date>/<time>` go: `$VITEXP_OUTPUTS`, else the checkout."""
    return os.environ.get(OUTPUTS_ENV) or str(BASE)


# conf/config.yaml's run and sweep directories read it as ${vitexp.outputs:}. Registered on import: every
# process that composes or runs a config (train.py, a SLURM job unpickling its task) imports vitexp.config first.
# Cached, as Hydra's ${now:}: a job resolves its directory from the launcher's value (Hydra copies the cache),
# not from its own environment.
OmegaConf.register_new_resolver("vitexp.outputs", outputs_root, replace=True, use_cache=True)
