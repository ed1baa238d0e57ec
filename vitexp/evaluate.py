"""Evaluate a finished run's weights again, on a split and data of your choosing, with the run's own test.

`python -m vitexp.evaluate <run dir> [evaluate.split=test evaluate.checkpoint=best evaluate.out=FILE]
[data.KEY=VALUE ... trainer.device=cpu]` rebuilds the run from its checkpoint (the config the weights were
trained with), applies the `data.*` and `trainer.*` execution overrides given (a data set moved to another
`data.root`, a larger `data.eval_batch_size`, `trainer.device=cpu`), evaluates with the very code the run's
test used (`Trainer.evaluate_model`), prints the metrics as the run's test line does, and writes them as JSON,
by default to `<run dir>/evaluate_<checkpoint>_<split>.json`. It never replaces an existing file unless
`evaluate.overwrite=true`, and writes nothing else: a data set missing from `data.root` is an error, not a
download (unless `data.download=true`), and a pretrained model is not fetched again. The model, augmentation
and optimizer come from the checkpoint: overriding them would evaluate weights the run did not train, so that
is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitexp import checkpoint
from vitexp.checkpoint import BEST_FILE, LAST_FILE, CheckpointError
from vitexp.cli import parse_tool_args, run_tool, write_output
from vitexp.config import GROUPS, Config, ConfigError, Rule, config_hash, registered_options, validate

log = logging.getLogger("vitexp")

PREFIX = "evaluate."
SPLITS = ("train", "val", "test")
CHECKPOINTS = {"best": BEST_FILE, "last": LAST_FILE}
EXECUTION_KEYS = ("trainer.device", "trainer.precision", "trainer.threads", "trainer.deterministic")


@dataclass
class EvaluateConfig:
    split: str = "test"  # the split evaluated: test (as the run's test), val or train (its evaluation transform)
    checkpoint: str = "best"  # best: best.pt, the weights the run's test ran on; last: last.pt, the latest epoch
    out: str | None = None  # the JSON file to write; None: <run dir>/evaluate_<checkpoint>_<split>.json
    overwrite: bool = False  # replace an existing output file (else that is an error and nothing is written)

    def rules(self) -> Iterator[Rule]:
        yield "split", self.split in SPLITS, f"one of {', '.join(SPLITS)}"
        yield "checkpoint", self.checkpoint in CHECKPOINTS, f"one of {', '.join(CHECKPOINTS)}"
        yield "out", self.out is None or self.out.endswith(".json"), "a file name ending in .json"


def parse_args(argv: Sequence[str]) -> tuple[Path, EvaluateConfig, list[str]]:
    """The run directory, the checked `evaluate.*` items and the config overrides; anything else is an error."""
    cfg, rest = parse_tool_args(argv, PREFIX, EvaluateConfig)
    overrides = [arg for arg in rest if "=" in arg and not Path(arg).exists()]
    run_dirs = [arg for arg in rest if arg not in overrides]
    for arg in overrides:
        key = arg.split("=")[0].lstrip("+~")
        if not (key.startswith("data.") or key in EXECUTION_KEYS):
            raise ConfigError(
                f"{key} is not read by evaluate: the model and training come from the checkpoint; it takes data.* "
                f"and {', '.join(EXECUTION_KEYS)} overrides and {PREFIX}KEY=VALUE items"
            )
    if len(run_dirs) != 1:
        got = f"got {len(run_dirs)}: {' '.join(run_dirs)}" if run_dirs else "got none"
        raise ConfigError(f"expected one run directory (a train.py output directory holding {BEST_FILE}), {got}")
    return Path(run_dirs[0]), cfg, overrides


def require_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint file to evaluate, or a ConfigError saying what the directory holds instead."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: expected a run directory of train.py holding {BEST_FILE}")
    path = run_dir / CHECKPOINTS[which]
    if path.is_file():
        return path
    others = [name for name, file in CHECKPOINTS.items() if (run_dir / file).is_file()]
    hint = (
        f"evaluate.checkpoint={others[0]} evaluates {CHECKPOINTS[others[0]]} instead"
        if others
        else "it is not a train.py run directory, the run has not finished an epoch, or its checkpoints were deleted "
        "(trainer.save_best=false, trainer.keep_last=false)"
    )
    raise ConfigError(f"{run_dir} holds no {path.name}: {hint}")


def run_config(stored: dict[str, Any], overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """The run's config with the overrides, typed by each chosen option's schema and validated as a run's is."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vitexp.groups import register_schemas

    register_schemas()
    schema = OmegaConf.structured(Config)
    defaults = {"data": {"download": False}}  # a missing data set is an error naming it, not a download
    try:
        for group in GROUPS:
            name = stored.get(group, {}).get("name")
            options = registered_options(group)
            if name not in options:
                raise ConfigError(f"the run's {group} option {name!r} is not one of {', '.join(options)}")
            schema[group] = OmegaConf.structured(options[name])
        cfg = OmegaConf.merge(schema, {**stored, "logger": {}}, defaults, OmegaConf.from_dotlist(overrides))
        if "pretrained" in cfg.model:  # the checkpoint's weights replace them: never download ImageNet's
            cfg.model.pretrained = False
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"the run's config does not fit this version's schema, or an override does not: {err}"
        ) from None
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return validate(cfg), config


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    """Run the command; returns what it wrote."""
    from vitexp.engine import Trainer

    run_dir, cfg, overrides = parse_args(argv)
    path = require_checkpoint(run_dir, cfg.checkpoint)
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"{path} holds no config: it was not written by this version's train.py")
    typed, config = run_config(state["config"], overrides)
    out = Path(cfg.out) if cfg.out else run_dir / f"evaluate_{cfg.checkpoint}_{cfg.split}.json"
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists: set evaluate.overwrite=true to replace it, or evaluate.out=FILE")
    trainer = Trainer(typed, run_dir, config, choices={})
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as err:  # data overrides that change the model's shape (classes, image size)
        reason = str(err).splitlines()[-1].strip()
        raise CheckpointError(f"{path}'s weights do not fit the model these overrides build: {reason}") from None
    metrics = trainer.evaluate_model(trainer.forward, cfg.split)
    epoch = state.get("epoch", state.get("progress", {}).get("epoch"))
    record = {
        "run_dir": str(run_dir),
        "checkpoint": path.name,
        "epoch": epoch,
        "split": cfg.split,
        "overrides": overrides,
        "metrics": metrics,
        "config_hash": config_hash(state["config"]),  # the run's (the overrides change only how it is read)
    }
    write_output(out, (json.dumps(record, indent=2) + "\n").encode(), cfg.overwrite)
    shown = (metrics[key] for key in ("acc", "acc5", "f1", "ece", "loss"))
    line = "%s (%s, epoch %s): acc %.4f  acc5 %.4f  f1 %.4f  ece %.4f  nll %.4f; wrote %s"
    log.info(line, cfg.split, path.name, epoch, *shown, out)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: a bad argument or a directory without the checkpoint exits 2 with one `error:` line;
    a checkpoint or data set that cannot be read exits 1, as train.py does."""
    run_tool(evaluate, __doc__, argv)


if __name__ == "__main__":
    main()
