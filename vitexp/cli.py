"""The command line shared by vitexp's tools (`python -m vitexp.lr_find | preview | explain ...`): help, logging,
and the exit status train.py gives: 2 with one `error:` line for a value vitexp refuses, 1 for what Hydra
refuses or a run that cannot be read."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vitexp.config import Config, ConfigError, validate
from vitexp.paths import CONF_DIR


def run_tool(tool: Callable[[list[str]], Any], doc: str | None, argv: Sequence[str] | None = None) -> None:
    """Run `tool` on the command line's arguments (`argv`, else sys.argv); `-h` prints `doc`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vitexp.checkpoint import CheckpointError
    from vitexp.models import PretrainedWeightsError
    from vitexp.rundir import LOG_FORMAT
    from vitexp.splits import DataError

    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(doc)
        return
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    refused = (ConfigError, HydraException, OmegaConfBaseException, DataError, PretrainedWeightsError, CheckpointError)
    try:
        tool(args)
    except refused as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)  # 1: Hydra's composition errors, as train.py


def write_output(out: Path, data: bytes, overwrite: bool) -> None:
    """A tool's output file: replaced atomically when `overwrite` was asked, else created, never replacing a file
    that appeared since the tool checked (the user's, say)."""
    from vitexp.checkpoint import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        atomic_write(out, lambda file: file.write(data))
        return
    with out.open("xb") as file:
        file.write(data)


# How a `tool.key=value` text becomes a field's value, by the field's annotation.
CONVERTERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "an integer"),
    "float": (float, "a float"),
    "bool": (lambda text: {"true": True, "false": False}[text.lower()], "true or false"),
    "str": (str, "a string"),
}


def parse_tool_args(argv: Sequence[str], prefix: str, schema: type) -> tuple[Any, list[str]]:
    """Split `prefix.key=value` items, converted by the type of `schema`'s field and checked by its `rules()`,
    from the other arguments. An unknown key, a missing value or a value of the wrong type is a ConfigError
    naming the key; `null` (or nothing) is None for a field that may be None."""
    fields = {field.name: str(field.type) for field in dataclasses.fields(schema)}
    values: dict[str, Any] = {}
    rest = []
    for arg in argv:
        if not arg.lstrip("+~").startswith(prefix):
            rest.append(arg)
            continue
        key, has_value, text = arg.lstrip("+~").removeprefix(prefix).partition("=")
        if key not in fields or not has_value:
            valid = ", ".join(prefix + name for name in fields)
            raise ConfigError(f"unknown key {prefix}{key} (expected {prefix}KEY=VALUE; valid keys: {valid})")
        kind, optional = fields[key].removesuffix(" | None"), fields[key].endswith(" | None")
        if optional and text in ("null", "None", ""):
            values[key] = None
            continue
        convert, what = CONVERTERS[kind]
        try:
            values[key] = convert(text)
        except (KeyError, ValueError):
            raise ConfigError(f"{prefix}{key}={text!r} is not allowed: expected {what}") from None
    cfg = schema(**values)
    for key, holds, allowed in cfg.rules():
        if not holds:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)!r} is not allowed: expected {allowed}")
    return cfg, rest


def parse_train_tool_args(
    argv: Sequence[str], prefix: str, schema: type, reader: str, output_key: str
) -> tuple[Any, list[str]]:
    """`parse_tool_args` for a tool that composes train.py's config from the other arguments: a `hydra.*` one is
    refused (the tool writes where `output_key` says, not in a Hydra run directory)."""
    cfg, overrides = parse_tool_args(argv, prefix, schema)
    for arg in overrides:
        if arg.startswith("hydra."):
            raise ConfigError(f"{arg.split('=')[0]} is not read by {reader}: set {output_key} for its output")
    return cfg, overrides


def compose_train_config(overrides: list[str]) -> tuple[Config, dict[str, Any], dict[str, str]]:
    """train.py's config for these overrides, validated as a run would be: (typed, plain dict, group choices)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from vitexp.config import GROUPS
    from vitexp.groups import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = {group: str(cfg.hydra.runtime.choices[group]) for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    typed = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return typed, config, choices
