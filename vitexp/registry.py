"""One registry per config group: each option's schema and its builder, registered side by side.

A group module declares its options where it builds them:

    MODELS = Registry("model")

    @MODELS.register("vit", ViTConfig)
    def build_vit(cfg: ViTConfig, num_classes: int, img_size: int) -> nn.Module: ...

Builders are found by the option's `name`, never by the type of its config, so a new option is a new
registration and nothing else changes. `vitexp.groups` collects the registries for Hydra's config store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from vitexp.config import ConfigError

Built = TypeVar("Built")
Builder = TypeVar("Builder", bound=Callable[..., Any])


@dataclass(frozen=True)
class Option(Generic[Built]):
    name: str
    schema: type
    build: Callable[..., Built]


class Registry(Generic[Built]):
    """The options of one config group, by name."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.options: dict[str, Option[Built]] = {}

    def register(self, name: str, schema: type) -> Callable[[Builder], Builder]:
        """Decorator: `build` makes this option from a config of type `schema` whose `name` is `name`."""

        def add(build: Builder) -> Builder:
            if name in self.options:
                raise ValueError(f"{self.group} option {name!r} is registered twice")
            self.options[name] = Option(name, schema, build)
            return build

        return add

    def __getitem__(self, name: str) -> Option[Built]:
        if name not in self.options:
            raise ConfigError(f"{self.group}.name={name!r} is not allowed: expected one of {', '.join(self.options)}")
        return self.options[name]

    def __iter__(self) -> Iterator[Option[Built]]:
        return iter(self.options.values())

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Built:
        """Build the option `cfg.name`; a config of another schema (e.g. a subclass) is refused, not guessed."""
        option = self[cfg.name]
        if type(cfg) is not option.schema:
            raise ConfigError(
                f"{self.group}.name={cfg.name!r} is built from the schema {option.schema.__name__}, "
                f"not from {type(cfg).__name__}: register the new schema under a name of its own"
            )
        return option.build(cfg, *args, **kwargs)
