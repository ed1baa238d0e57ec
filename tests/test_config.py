"""Composition of every group option from the real conf/, and the clear failure of every bad value."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import MISSING as MISSING_VALUE
from omegaconf import OmegaConf

from tests.conftest import CONF, run_train
from vitexp.augment import CutMixConfig
from vitexp.config import Config, ConfigError, TrainerConfig, validate
from vitexp.groups import REGISTRIES
from vitexp.models import ResNetConfig

OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "aug", "data", "optim", "sched", "probe", "logger")
}
REGISTRY = {registry.group: registry for registry in REGISTRIES}


def test_every_group_has_the_options_the_docs_promise() -> None:
    assert OPTIONS["model"] == ["cnn", "resnet18", "resnet18_attn", "vit", "vit_small", "vit_tiny"]
    assert OPTIONS["aug"] == ["cutmix", "cutout", "mixup", "mixup_cutmix", "none", "random_erasing"]
    assert {"pets", "digits"} <= set(OPTIONS["data"])
    assert OPTIONS["optim"] == ["adam", "adamw", "sgd"]
    assert OPTIONS["sched"] == ["cosine", "none"]
    assert OPTIONS["logger"] == ["none", "tensorboard", "wandb"]
    assert OPTIONS["probe"] == ["linear", "none", "svc"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in OPTIONS.items() for o in opts])
def test_every_option_composes_and_validates(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}")
    typed = validate(cfg)
    if group == "logger":  # any number of sinks, each under logger.<name>
        assert list(typed.logger) == ([] if option == "none" else [option])
        if option == "none":
            return
    node = typed.logger[option] if group == "logger" else getattr(typed, group)
    assert type(node) is REGISTRY[group][node.name].schema  # the option's own schema, as registered
    if group != "model":  # model presets (vit_small) share the vit option
        assert node.name == option


def test_every_registered_option_has_a_config_file() -> None:
    for group, registry in REGISTRY.items():
        names = {option.name for option in registry}
        assert names <= set(OPTIONS[group]), f"{group}: registered without conf/{group}/<name>.yaml"


def test_defaults_and_overrides(make_cfg) -> None:
    typed = validate(make_cfg())
    assert (typed.model.name, typed.aug.name, typed.data.name, list(typed.logger)) == ("vit", "none", "pets", ["wandb"])
    assert typed.smoothing == 0.0
    typed = validate(
        make_cfg(
            "optim.lr=3e-4",
            "trainer.epochs=50",
            "model=resnet18",
            "model.pretrained=true",
            "data.img_size=160",
            "aug=cutmix",
            "smoothing=0.1",
        )
    )
    assert typed.optim.lr == 3e-4 and typed.trainer.epochs == 50 and typed.data.img_size == 160
    assert isinstance(typed.model, ResNetConfig) and typed.model.pretrained
    assert isinstance(typed.aug, CutMixConfig) and typed.smoothing == 0.1
    assert typed.data.stored_size == round(160 / 0.875)


@pytest.mark.parametrize("smoothing", [0, 0.05, 0.1, 0.2, 0.999])
def test_smoothing_accepts_values_in_unit_interval(make_cfg, smoothing: float) -> None:
    assert validate(make_cfg(f"smoothing={smoothing}")).smoothing == pytest.approx(smoothing)


@pytest.mark.parametrize(
    "override,message",
    [
        ("smoothing=1.5", "smoothing=1.5 is not allowed: expected a float in [0, 1)"),
        ("smoothing=-0.1", "smoothing=-0.1 is not allowed"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed: expected an integer >= 1"),
        ("optim.lr=-1", "optim.lr=-1.0 is not allowed: expected a float > 0"),
        ("data.val_fraction=1.2", "data.val_fraction=1.2 is not allowed: expected a float in [0, 1)"),
        ("model.patch_size=15", "model.patch_size=15 is not allowed: expected a divisor of data.img_size=224"),
        ("model.heads=7", "model.heads=7 is not allowed"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed: expected one of auto, fp32, bf16, fp16"),
        ("data.crop_scale=[0.5,0.1]", "data.crop_scale=[0.5, 0.1] is not allowed"),
        ("model.patch_size=0", "model.patch_size=0 is not allowed: expected an integer >= 1"),
        ("data.img_size=8", "data.img_size=8 is not allowed: expected at least model.patch_size=16 (one patch)"),
        ("sched.min_lr=0.01", "sched.min_lr=0.01 is not allowed: expected at most optim.lr=0.001"),
        ("seed=-1", "seed=-1 is not allowed: expected an integer in [0, 2**32)"),
        ("seed=4294967296", "seed=4294967296 is not allowed: expected an integer in [0, 2**32)"),
        ("data.split_seed=-3", "data.split_seed=-3 is not allowed: expected an integer in [0, 2**32)"),
        ("trainer.swa_start=31", "trainer.swa_start=31 is not allowed: expected an epoch in [1, epochs]"),
        ("trainer.swa_lr=0", "trainer.swa_lr=0.0 is not allowed: expected a float > 0, or null"),
        ("trainer.samples=0", "trainer.samples=0 is not allowed: expected an integer >= 1, or null"),
        ("trainer.early_stop_patience=-1", "trainer.early_stop_patience=-1 is not allowed: expected an integer >= 0"),
        ("data.crop=center", "data.crop='center' is not allowed: expected one of random_resized, pad_crop, squash"),
        ("model.freeze=all", "model.freeze='all' is not allowed: expected one of none, backbone"),
        ("optim.backbone_lr_scale=0", "optim.backbone_lr_scale=0.0 is not allowed: expected a float > 0"),
    ],
)
def test_out_of_range_values_fail_naming_key_value_and_range(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(make_cfg(override))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_nesterov_needs_momentum(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"optim.nesterov=True is not allowed: expected false with optim.momentum=0"):
        validate(make_cfg("optim=sgd", "optim.momentum=0"))
    assert validate(make_cfg("optim=sgd", "optim.momentum=0", "optim.nesterov=false")).optim.momentum == 0


def test_min_lr_above_lr_is_fine_without_the_cosine(make_cfg) -> None:
    assert validate(make_cfg("sched=none", "sched.min_lr=0.01")).sched.min_lr == 0.01


def test_warmup_longer_than_the_run_is_a_warning(make_cfg) -> None:
    assert list(validate(make_cfg("trainer.epochs=3")).warnings()) == [
        "sched.warmup_epochs=5 >= trainer.epochs=3: the learning rate never reaches optim.lr"
    ]
    assert list(validate(make_cfg("trainer.epochs=6")).warnings()) == []
    assert list(validate(make_cfg("trainer.epochs=3", "sched=none")).warnings()) == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+trainer.epoch=3"], "trainer.epoch (did you mean trainer.epochs?)"),
        (["++trainer.epoch=50"], "trainer.epoch (did you mean trainer.epochs?)"),
        (["+optim.weight_decy=0.1"], "optim.weight_decy (did you mean optim.weight_decay?)"),
        (["+aug.alpha=0.4"], "aug.alpha (only aug=mixup or aug=cutmix has it, e.g. aug=mixup aug.alpha=..."),
        (["+epochs=3"], "epochs (did you mean trainer.epochs?)"),
        (["+lr=0.1"], "lr (did you mean optim.lr?)"),
        (["+zzz=1"], "zzz (valid keys here: model, aug, data, optim, sched, probe, logger, trainer, seed, smoothing"),
        (
            ["+model.depht=2", "+data.sise=3"],
            "keys, nothing would read it: model.depht (did you mean model.depth?); data",
        ),
    ],
)
def test_keys_added_with_plus_that_no_schema_has_are_refused(make_cfg, overrides: list[str], message: str) -> None:
    cfg = make_cfg(*overrides)  # Hydra lets `+` and `++` add any key
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_option_and_misspelled_key_fail_at_composition(make_cfg) -> None:
    with pytest.raises(MissingConfigException, match="model/vitt"):
        make_cfg("model=vitt")
    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        make_cfg("optim.lrr=3")
    with pytest.raises(ConfigCompositionException, match="model.pretrained"):
        make_cfg("model=vit", "model.pretrained=true")  # a ResNet key on a ViT


@pytest.mark.parametrize(
    "override,expected",
    [("smoothing=1.5", "smoothing=1.5 is not allowed"), ("aug=cutmixx", "Could not find 'aug/cutmixx'")],
)
def test_cli_fails_before_touching_data(tmp_path: Path, override: str, expected: str) -> None:
    root = tmp_path / "data"
    result = run_train(override, f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert result.returncode != 0
    assert expected in result.stderr
    assert not root.exists(), "validation must fail before the dataset is touched"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["+trainer.epoch=3"],
            "unknown config key, nothing would read it: trainer.epoch (did you mean trainer.epochs?)",
        ),
        (["dry_run=true"], "dry_run=true lists the jobs of a sweep and launches nothing: add -m"),
        (["+sweep=aug_smoothing"], "+sweep=aug_smoothing defines a sweep, but without -m this would train one run"),
    ],
)
def test_single_run_refuses_what_it_would_ignore(tmp_path: Path, overrides: list[str], expected: str) -> None:
    root, run_dir = tmp_path / "data", tmp_path / "run"
    result = run_train(*overrides, f"data.root={root}", f"hydra.run.dir={run_dir}", "logger=none")
    assert result.returncode == 2
    assert f"error: {expected}" in result.stderr and "Traceback" not in result.stderr
    assert not root.exists() and list(run_dir.iterdir()) == []  # nothing trained, nothing written


def test_cutout_hole_must_fit_the_image(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"aug.length=300 is not allowed: expected at most data.img_size=224 pixels"):
        validate(make_cfg("aug=cutout", "aug.length=300"))
    assert validate(make_cfg("aug=cutout")).aug.length is None  # a quarter of the image side


def schema_of(path: Path) -> type:
    """The schema a conf/<group>/<option>.yaml extends (its `/schema/<group>/<name>` default)."""
    [entry] = [d for d in OmegaConf.load(path).get("defaults", []) if str(d).startswith("/schema/")]
    group, name = entry.split("@")[0].split("/")[2:4]
    return REGISTRY[group][name].schema


@pytest.mark.parametrize("path", sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name in REGISTRY), ids=str)
def test_no_option_file_restates_a_schema_default(path: Path) -> None:
    """Defaults are stated once, in the schemas: an option's YAML sets only what differs from them."""
    raw = OmegaConf.load(path)
    if not raw.get("defaults"):  # logger=none chooses no sink and sets nothing
        assert set(raw) == set()
        return
    own = raw.get(path.parent.name, raw) if "@package _global_" in path.read_text() else raw
    defaults = OmegaConf.structured(schema_of(path))
    restated = [key for key in own if key != "defaults" and key in defaults and own[key] == defaults[key]]
    assert not restated, f"{path.name} restates the defaults of {', '.join(restated)}"


def test_every_setting_says_what_it_means_where_it_is_defined() -> None:
    """Each key with a default has a comment on its line in its schema (`name` and group nodes excepted)."""
    schemas = {option.schema for registry in REGISTRIES for option in registry} | {TrainerConfig, Config}
    silent = []
    for schema in schemas:
        for klass in schema.__mro__:
            if not dataclasses.is_dataclass(klass):
                continue
            source = inspect.getsource(klass).splitlines()
            own = {f.name for f in dataclasses.fields(klass) if f.name in inspect.get_annotations(klass)}
            for name in own - {"name"}:
                field = next(f for f in dataclasses.fields(klass) if f.name == name)
                if field.default is MISSING_VALUE or dataclasses.is_dataclass(field.default_factory):
                    continue
                [line] = [line for line in source if line.strip().startswith(f"{name}:")]
                if "#" not in line and not any(f"{name}:" in line for line in inherited_comments(klass, name)):
                    silent.append(f"{klass.__name__}.{name}")
    assert not silent, f"say what these keys mean where they are defined: {', '.join(sorted(set(silent)))}"


def inherited_comments(klass: type, name: str) -> list[str]:
    """Commented lines defining `name` in the classes `klass` overrides it from (a changed default keeps its
    meaning, so `MixupConfig.alpha` is documented by `MixConfig.alpha`)."""
    lines = []
    for base in klass.__mro__[1:]:
        if dataclasses.is_dataclass(base) and name in inspect.get_annotations(base):
            lines += [line for line in inspect.getsource(base).splitlines() if line.strip().startswith(f"{name}:")]
    return [line for line in lines if "#" in line]
