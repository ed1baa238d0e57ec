"""`python train.py ...` and `vitexp-train ...`: one run, or a sweep with `-m`, from any working directory.

Help and shell completion compose the config without training anything, so they skip torch: the option
schemas live beside their builders (which import torch), and in their place Hydra gets plain nodes, enough to
list the groups, their options and the top-level and trainer keys in well under the seconds torch takes to
import (an option's own keys, `model.depth`, are left out of what help and completion compose).
"""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vitexp.config import Config
from vitexp.paths import CONF_DIR

HELP_FLAGS = {"-h", "--help", "--hydra-help", "-sc", "--shell-completion"}  # they compose, but run nothing
SENTENCE_END = re.compile(r"(?<! al)(?<!e\.g)\.\s")  # "Yun et al. 2019" goes on
SCHEMA_REFERENCE = re.compile(r"/schema/(\w+)/(\w+)@\w+")  # how conf/<group>/<option>.yaml extends its schema
OPTION_KEY = re.compile(r"^[+~]*(?!trainer\.|hydra\.)\w+\.[^=]*=")  # `data.batch_size=8`: a key of a group's option


def register_help_schemas() -> None:
    """Plain stand-ins for the schemas, without importing torch: the top-level keys and the trainer's defaults
    (vitexp.config), and an empty node for every option schema a YAML file extends."""
    store = ConfigStore.instance()
    store.store(name="schema", node=OmegaConf.to_container(OmegaConf.structured(Config)))
    for path in CONF_DIR.rglob("*.yaml"):
        for group, option in SCHEMA_REFERENCE.findall(path.read_text()):
            store.store(group=f"schema/{group}", name=option, node={})


def option_summary(text: str, width: int = 100) -> str:
    """An option file's first comment sentence (cut to `width`): what `--help` says of it."""
    block = []
    for line in text.splitlines():
        if not line.startswith("# ") or line.startswith("#   "):  # the comment ends, or its examples begin
            if block:
                break
            continue
        if "@package" not in line:
            block.append(line[2:].strip())
    sentence = SENTENCE_END.split(" ".join(block), maxsplit=1)[0].rstrip(".:;, ")
    return sentence if len(sentence) <= width else sentence[: width - 1].rsplit(" ", 1)[0] + "…"


def options_help() -> str:
    """Every config group with its options, one line each; `+` where the group is not in config.yaml's defaults."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    chosen = {next(iter(item)): next(iter(item.values())) for item in defaults if isinstance(item, DictConfig)}
    groups = sorted(
        (path for path in CONF_DIR.iterdir() if path.is_dir() and path.name != "hydra"),
        key=lambda path: (path.name not in chosen, path.name),
    )
    lines = []
    for group in groups:
        default = f" (default: {chosen[group.name]})" if chosen.get(group.name) else ""
        lines.append(f"  {'' if group.name in chosen else '+'}{group.name}=...{default}")
        lines += [f"      {path.stem:<16} {option_summary(path.read_text())}" for path in sorted(group.glob("*.yaml"))]
    lines.append("  hydra/launcher=... (with -m; default: one job after another in this process)")
    lines.append(f"      {'submitit_local':<16} the jobs as local processes, several at once (hydra.launcher.*)")
    launchers = sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
    lines += [f"      {path.stem:<16} {option_summary(path.read_text())}" for path in launchers]
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the help text in with string.Template


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float:
    """Hydra's task; returns the best validation accuracy, the objective an optimizing sweeper may read."""
    from vitexp.run import main as run_main

    return run_main(cfg)


def without_option_keys(words: list[str]) -> list[str]:
    """The words help and completion can compose: the stand-in schemas have no option keys (`model.depth`)."""
    return [word for word in words if not OPTION_KEY.match(word)]


def main() -> None:
    if HELP_FLAGS & set(sys.argv[1:]):
        OmegaConf.register_new_resolver("vitexp.options_help", options_help, replace=True)
        register_help_schemas()
        sys.argv[1:] = without_option_keys(sys.argv[1:])
        if line := os.environ.get("COMP_LINE"):  # a completion query: the words before the one being completed
            *before, last = line.split(" ")
            os.environ["COMP_LINE"] = " ".join([*without_option_keys(before), last])
    else:
        from vitexp.groups import register_schemas

        register_schemas()
    task()


if __name__ == "__main__":
    main()
