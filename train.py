"""Train one model: `python train.py aug=cutmix smoothing=0.1` (see conf/ for every option)."""

import hydra
from omegaconf import DictConfig

from vitexp.groups import register_schemas
from vitexp.run import main as run_main

register_schemas()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best validation accuracy, the objective an optimizing sweeper may read."""
    return run_main(cfg)


if __name__ == "__main__":
    main()
