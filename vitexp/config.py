"""Typed schemas for every config group, and the range checks Hydra's types cannot express.

Hydra composes `conf/` against these dataclasses, so a misspelled key or a value of the wrong type fails
at composition. `validate` then turns the composed config into these objects and checks ranges, so
`smoothing=1.5` fails before any data is touched, with one line naming the key, the value and what is
allowed. Hydra lets `+key=value` and `++key=value` add keys that no schema has; `validate` refuses those
too, so a typo never turns into an experiment that silently ignores its override.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from vitexp.paths import data_root

GROUPS = ("model", "aug", "data", "optim", "sched", "probe")  # the groups with one option each in conf/<group>/
SINK_GROUP = "logger"  # the group of which any number of options are chosen, each under logger.<name>


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the key."""


Rule = tuple[str, bool, str]  # (field name, holds?, what is allowed)


@dataclass
class GroupConfig:
    """The base of every group option's schema: the option's `name`, its own ranges and cross-group rules."""

    def rules(self) -> Iterator[Rule]:
        """This option's own ranges, keys relative to the group (`patch_size`)."""
        yield from ()

    def rules_in(self, config: Config) -> Iterator[Rule]:
        """Rules that involve other groups, full keys (`data.img_size`); checked after every group's ranges."""
        yield from ()


FREEZES = ("none", "backbone")


@dataclass
class ModelConfig(GroupConfig):
    """A model option (the schemas live with their builders in `vitexp.models`)."""

    name: str = MISSING
    freeze: str = "none"  # none, or backbone: train only the classification head (fine-tuning)

    def rules(self) -> Iterator[Rule]:
        yield "freeze", self.freeze in FREEZES, f"one of {', '.join(FREEZES)}"


@dataclass
class AugConfig(GroupConfig):
    """A batch augmentation (options in `vitexp.augment`); this schema itself is the option `none`."""

    name: str = "none"


POLICIES = ("none", "autoaugment", "trivialaugment", "randaugment")
RESAMPLES = ("auto", "grid_sample")
CROPS = ("random_resized", "pad_crop", "squash")


@dataclass
class DataConfig(GroupConfig):
    """The schema of every dataset option (loaders in `vitexp.data`)."""

    name: str = "pets"
    root: str = field(default_factory=data_root)  # the datasets' directory: $VITEXP_DATA, else data/ in the checkout
    download: bool = True  # download a missing dataset; false: a missing root is an error
    img_size: int = 224  # side of the square images the model sees
    crop_pct: float = 0.875  # stored images are img_size / crop_pct; eval takes the center crop
    cache: bool = True  # decode once into a uint8 cache next to the dataset (Pets)
    cache_dir: str | None = None  # where the cache and locks live; None: next to the dataset (Pets, under data.root)
    on_device: str = "auto"  # keep the uint8 splits on the training device: auto, true or false
    policy: str = "none"  # per-image CPU policy in DataLoader workers: autoaugment, trivialaugment, randaugment
    resample: str = "auto"  # the crop's resize: auto (per-image uint8 on CPU, grid_sample on GPU) or grid_sample
    crop: str = "random_resized"  # training crop: random_resized, pad_crop (pad, crop img_size) or squash (none)
    crop_padding: int = 4  # pad_crop: pixels of zero padding on each side before the random crop
    batch_size: int = 64  # training images per micro-batch (trainer.accumulate micro-batches per step)
    eval_batch_size: int = 256  # validation and test batches (no activations kept, so larger)
    num_workers: int = 4  # DataLoader processes, when batches come from the CPU
    limit_batches: int | None = None  # debug: keep a seeded N batches' worth of each split (train and val/test)
    val_fraction: float = 0.1  # share of the training split held out for validation, per class; 0: select on test
    split_seed: int = 0  # which images are held out: fixed across seeds, so seeds compare on one split
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # random resized crop: area range
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # and aspect-ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # normalisation, RGB (ImageNet)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # and its standard deviations

    def rules(self) -> Iterator[Rule]:
        yield "img_size", self.img_size >= 8, "an integer >= 8"
        yield "on_device", self.on_device.lower() in ("auto", "true", "false"), "auto, true or false"
        yield "policy", self.policy in POLICIES, f"one of {', '.join(POLICIES)}"
        yield "resample", self.resample in RESAMPLES, f"one of {', '.join(RESAMPLES)}"
        yield "crop", self.crop in CROPS, f"one of {', '.join(CROPS)}"
        yield "crop_padding", self.crop_padding >= 0, "an integer >= 0"
        yield (
            "on_device",
            not (self.on_device.lower() == "true" and self.policy != "none"),
            ("auto or false with a per-image data.policy (it runs in DataLoader workers)"),
        )
        yield "crop_pct", 0 < self.crop_pct <= 1, "a float in (0, 1]"
        yield "batch_size", self.batch_size >= 1, "an integer >= 1"
        yield "eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1"
        yield "limit_batches", self.limit_batches is None or self.limit_batches >= 1, "an integer >= 1, or null"
        yield "num_workers", self.num_workers >= 0, "an integer >= 0"
        yield "val_fraction", 0 <= self.val_fraction < 1, "a float in [0, 1) (0: the test split selects the model)"
        scale, ratio = self.crop_scale, self.crop_ratio
        yield "crop_scale", len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "[min, max] with 0 < min <= max <= 1"
        yield "crop_ratio", len(ratio) == 2 and 0 < ratio[0] <= ratio[1], "[min, max] with 0 < min <= max"
        yield "hflip", 0 <= self.hflip <= 1, "a probability in [0, 1]"
        yield "mean", len(self.mean) == 3, "three floats (RGB)"
        yield "std", len(self.std) == 3 and min(self.std) > 0, "three floats > 0 (RGB)"

    @property
    def stored_size(self) -> int:
        """Side of the square uint8 images kept before cropping: img_size / crop_pct for the random resized
        crop (256 for img_size 224), img_size itself for pad_crop (padded, cropped back) and squash (no crop)."""
        return round(self.img_size / self.crop_pct) if self.crop == "random_resized" else self.img_size


@dataclass
class OptimConfig(GroupConfig):
    """An optimizer option (the schemas live with their builders in `vitexp.optim`)."""

    name: str = MISSING
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.05  # decoupled; never applied to norms, biases, tokens or position embeddings
    backbone_lr_scale: float = 1.0  # the learning rate of a pretrained model's backbone, relative to its head's

    def rules(self) -> Iterator[Rule]:
        yield "lr", self.lr > 0, "a float > 0"
        yield "weight_decay", self.weight_decay >= 0, "a float >= 0"
        yield "backbone_lr_scale", self.backbone_lr_scale > 0, "a float > 0 (freeze with model.freeze=backbone)"


@dataclass
class SchedConfig(GroupConfig):
    """The schema of every learning-rate schedule option (builders in `vitexp.optim`)."""

    name: str = "cosine"
    warmup_epochs: float = 5.0  # linear warmup from 0, in (fractional) epochs, stepped per step
    min_lr: float = 1e-5  # where the cosine ends

    def rules(self) -> Iterator[Rule]:
        yield "warmup_epochs", self.warmup_epochs >= 0, "a float >= 0"
        yield "min_lr", self.min_lr >= 0, "a float >= 0"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        if self.name == "cosine":
            lr = config.optim.lr
            yield "sched.min_lr", self.min_lr <= lr, f"at most optim.lr={lr:g} (the cosine decays down to it)"


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOSSES = ("ce", "l2")


@dataclass
class TrainerConfig(GroupConfig):
    epochs: int = 30  # training epochs; the test runs on the best validation epoch
    samples: int | None = None  # a budget in training images instead of epochs: as many epochs as reach it
    device: str = "auto"  # auto picks cuda when available
    precision: str = "auto"  # auto: bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU
    accumulate: Any = 1  # micro-batches per optimizer step, or {first epoch (0-based): micro-batches} by epoch
    clip_grad_norm: float = 1.0  # 0 disables clipping
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the model (slow first steps, faster after)
    max_nonfinite: int = 10  # consecutive skipped non-finite steps before the run fails
    log_every: int = 50  # steps between plain log lines when not on a terminal
    deterministic: bool = False  # deterministic kernels where torch has them (slower; warns where not)
    threads: int | None = None  # CPUs for torch and DataLoader workers; None: SLURM's, the launcher's, or all
    keep_last: bool = True  # keep last.pt once the run has finished (false: delete it; best.pt stays)
    save_best: bool = True  # keep best.pt once the run has been tested (false: delete it; results.json stays)
    ema_decay: float = 0.0  # an exponential moving average of the weights, validated and tested too; 0: off
    ema_warmup: bool = False  # timm's EMA warmup: decay min(ema_decay, (1 + step) / (10 + step))
    swa_start: int | None = None  # SWA: the first epoch (1-based) whose weights enter the average; None: off
    swa_lr: float | None = None  # SWA: the learning rate from swa_start on (as SWALR); None: the schedule's
    swa_anneal_epochs: int = 0  # SWA: epochs of cosine annealing to swa_lr; 0: switch at once
    early_stop_patience: int = 0  # stop after this many epochs without improvement; 0: off
    early_stop_metric: str = "val/acc"  # val/acc (higher is better) or val/loss (lower is better)
    early_stop_min_delta: float = 0.0  # the least change that counts as an improvement
    sync_bn: bool = False  # on several processes (DDP): BatchNorm statistics over the global batch (CUDA only)

    def rules(self) -> Iterator[Rule]:
        yield "epochs", self.epochs >= 1, "an integer >= 1"
        yield (
            "device",
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "auto, cpu, cuda or cuda:N",
        )
        yield "precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"
        yield "accumulate", accumulate_ok(self.accumulate), "an integer >= 1, or {epoch: factor} from epoch 0"
        yield "samples", self.samples is None or self.samples >= 1, "an integer >= 1, or null"
        yield "clip_grad_norm", self.clip_grad_norm >= 0, "a float >= 0 (0 disables)"
        yield "max_nonfinite", self.max_nonfinite >= 1, "an integer >= 1"
        yield "log_every", self.log_every >= 1, "an integer >= 1"
        yield "threads", self.threads is None or self.threads >= 1, "an integer >= 1, or null"
        yield "ema_decay", 0 <= self.ema_decay < 1, "a float in [0, 1) (0 turns the EMA off)"
        # With a budget in samples the last epoch is known only once the data is: then only the lower bound.
        last = None if self.samples is not None else self.epochs
        in_range = self.swa_start is None or (self.swa_start >= 1 and (last is None or self.swa_start <= last))
        yield "swa_start", in_range, "an epoch in [1, epochs]"
        yield "swa_lr", self.swa_lr is None or self.swa_lr > 0, "a float > 0, or null"
        yield "swa_anneal_epochs", self.swa_anneal_epochs >= 0, "an integer >= 0"
        yield "early_stop_patience", self.early_stop_patience >= 0, "an integer >= 0 (0 turns it off)"
        yield "early_stop_metric", self.early_stop_metric in EARLY_STOP_METRICS, "val/acc or val/loss"
        yield "early_stop_min_delta", self.early_stop_min_delta >= 0, "a float >= 0"

    def accumulate_at(self, epoch: int) -> int:
        """Micro-batches per optimizer step in `epoch` (0-based)."""
        if isinstance(self.accumulate, int):
            return self.accumulate
        return self.accumulate[max(start for start in self.accumulate if start <= epoch)]

    @property
    def accumulate_factors(self) -> list[int]:
        return [self.accumulate] if isinstance(self.accumulate, int) else list(self.accumulate.values())


EARLY_STOP_METRICS = {"val/acc": "max", "val/loss": "min"}


def accumulate_ok(accumulate: Any) -> bool:
    if isinstance(accumulate, int) and not isinstance(accumulate, bool):
        return accumulate >= 1
    return (
        isinstance(accumulate, dict)
        and 0 in accumulate
        and all(isinstance(k, int) and k >= 0 for k in accumulate)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in accumulate.values())
    )


@dataclass
class ProbeConfig(GroupConfig):
    """The schema of every probe option (`vitexp.probes`): a classifier fitted on the model's embeddings."""

    name: str = "none"  # none, svc (scikit-learn's SVC, default parameters) or linear (logistic regression)
    every: int = 1  # validation epochs between probes (the test is always probed)
    max_train: int = 2000  # training images embedded to fit it: a seeded subsample, so its cost stays bounded

    def rules(self) -> Iterator[Rule]:
        yield "every", self.every >= 1, "an integer >= 1"
        yield "max_train", self.max_train >= 2, "an integer >= 2"


@dataclass
class LoggerConfig(GroupConfig):
    """The base of every logger sink's schema (the sinks live in `vitexp.*_logger` modules)."""

    name: str = MISSING


# What an Optuna search may optimise (`hparams_search.metric`): a validation metric of every epoch, and the
# direction in which it improves. Never a test metric: the test set judges the chosen trial, it does not choose it.
SEARCH_METRICS = {"val/acc": "maximize", "val/loss": "minimize", "val_ema/acc": "maximize", "val_swa/acc": "maximize"}


@dataclass
class SearchConfig:
    """`hparams_search=optuna`: what the search optimises. Read by the sweeper (`vitexp.search`), not by the run."""

    metric: str = "val/acc"  # its best value over the run's validation epochs is the trial's objective
    direction: str = "maximize"  # the way `metric` improves; hydra.sweeper.direction follows it

    def rules(self) -> Iterator[Rule]:
        yield "metric", self.metric in SEARCH_METRICS, f"one of {', '.join(SEARCH_METRICS)} (never a test metric)"
        expected = SEARCH_METRICS.get(self.metric, self.direction)
        yield "direction", self.direction == expected, f"{expected} for {self.metric}"


@dataclass
class Config:
    model: ModelConfig = MISSING
    aug: AugConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    probe: ProbeConfig = MISSING
    logger: dict[str, Any] = field(default_factory=dict)  # sink name -> its config; files are always written
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0  # initial weights, data order and augmentation (not the train/val split: data.split_seed)
    smoothing: float = 0.0  # label smoothing epsilon in [0, 1), applied once to the (possibly mixed) target
    loss: str = "ce"  # ce: cross-entropy; l2: mean squared error between the soft target and the logits
    dry_run: bool = False  # with -m: print the job table of the grid and launch nothing
    hparams_search: SearchConfig | None = None  # set by hparams_search=optuna

    def rules(self) -> Iterator[Rule]:
        """Top-level ranges and the rules that tie groups together (checked after each group's own rules)."""
        yield "smoothing", 0 <= self.smoothing < 1, "a float in [0, 1)"
        yield "loss", self.loss in LOSSES, f"one of {', '.join(LOSSES)}"
        yield "seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"
        yield "data.split_seed", 0 <= self.data.split_seed < 2**32, "an integer in [0, 2**32)"
        for _, option in options_in(self):
            yield from option.rules_in(self)
        yield from self.trainer.rules_in(self)
        metric = self.hparams_search.metric if self.hparams_search is not None else None
        if metric == "val_ema/acc":
            yield "trainer.ema_decay", self.trainer.ema_decay > 0, "> 0: hparams_search.metric=val_ema/acc needs an EMA"
        if metric == "val_swa/acc":
            yield "trainer.swa_start", self.trainer.swa_start is not None, "an epoch: hparams_search.metric=val_swa/acc"

    def warnings(self) -> Iterator[str]:
        """Legal but probably unintended settings: worth a line in the log, not a refusal."""
        sched, epochs = self.sched, self.trainer.epochs
        if sched.name == "cosine" and sched.warmup_epochs >= epochs:
            yield (
                f"sched.warmup_epochs={sched.warmup_epochs:g} >= trainer.epochs={epochs}: "
                "the learning rate never reaches optim.lr"
            )
        if self.model.freeze == "backbone" and not getattr(self.model, "pretrained", False):
            name = self.model.name
            yield f"model.freeze=backbone on model={name} without pretrained weights: the head learns random features"


def registered_options(group: str) -> dict[str, type]:
    """A group's option names and schemas, as `vitexp.groups.register_schemas` stored them for Hydra."""
    stored = ConfigStore.instance().repo.get("schema", {}).get(group, {})
    return {name.removesuffix(".yaml"): OmegaConf.get_type(node.node) for name, node in stored.items()}


def options_in(typed: Config) -> Iterator[tuple[str, GroupConfig]]:
    """(the option's key prefix, its config) for every chosen option: `model.`, ..., `logger.wandb.`."""
    for group in GROUPS:
        yield f"{group}.", getattr(typed, group)
    for name, sink in typed.logger.items():
        yield f"{SINK_GROUP}.{name}.", sink


def check_options(typed: Config) -> None:
    """Every chosen option's `name` must be registered, configured with that option's own schema."""
    for prefix, node in options_in(typed):
        group = prefix.split(".")[0]
        options = registered_options(group)
        if not isinstance(node, GroupConfig):  # a sink key without a registered schema (`+logger.foo.x=1`)
            raise ConfigError(f"{prefix.rstrip('.')} is not a logger: expected one of {', '.join(options)}")
        if node.name not in options:
            raise ConfigError(f"{prefix}name={node.name!r} is not allowed: expected one of {', '.join(options)}")
        if type(node) is not options[node.name]:
            raise ConfigError(
                f"{prefix}name={node.name!r} has the schema {options[node.name].__name__}, not "
                f"{type(node).__name__}: register the new schema under a name of its own"
            )
        if group == SINK_GROUP and prefix != f"{SINK_GROUP}.{node.name}.":
            raise ConfigError(f"{prefix}name={node.name!r} is not allowed: a sink's key is its name")


def _format(value: Any) -> str:
    return str(list(value)) if isinstance(value, list) else repr(value)


def _unknown_keys(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted key, schema of its node) for every key of `node` that its schema does not define."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key, value in node.items_ex(resolve=False):
        if known is not None and key not in known:
            yield prefix + str(key), schema  # type: ignore[misc]
        elif isinstance(value, DictConfig) and not value._is_none():  # `hparams_search: null`
            yield from _unknown_keys(value, f"{prefix}{key}.")


def _all_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    for key, value in node.items_ex(resolve=False):
        if isinstance(value, DictConfig) and not value._is_none():
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _suggestion(key: str, schema: type, known: list[str]) -> str:
    """The closest key of the same node, the options of its group that have the key, or the closest key
    anywhere in the config (`+epochs=3` -> trainer.epochs)."""
    group, _, leaf = key.rpartition(".")
    prefix = f"{group}." if group else ""
    close = difflib.get_close_matches(leaf, [f.name for f in dataclasses.fields(schema)], n=1, cutoff=0.6)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    options = registered_options(group)
    owners = [name for name, option in options.items() if leaf in {f.name for f in dataclasses.fields(option)}]
    if owners:
        return f"only {' or '.join(f'{group}={o}' for o in owners)} has it, e.g. {group}={owners[0]} {key}=..."
    leaves = {k.rpartition(".")[2]: k for k in reversed(known)}
    elsewhere = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    if elsewhere:
        return f"did you mean {leaves[elsewhere[0]]}?"
    valid = [f.name for f in dataclasses.fields(schema)]
    return f"valid keys here: {', '.join(prefix + name for name in valid)}"


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys no schema defines (added with `+key=` or `++key=`): they would be silently ignored."""
    unknown = list(_unknown_keys(cfg))
    if unknown:
        known = [key for key in _all_keys(cfg) if key not in {k for k, _ in unknown}]
        listed = "; ".join(f"{key} ({_suggestion(key, schema, known)})" for key, schema in unknown)
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}, nothing would read it: {listed}")


def validate(cfg: DictConfig) -> Config:
    """Check keys and range rules and return the typed config; raise ConfigError naming the first bad key.

    Each group's own ranges are checked before the rules that combine groups, so a cross-group rule never
    sees a value its group has not accepted (`model.patch_size=0` is a range error, not a division by zero).
    """
    check_known_keys(cfg)
    typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    check_options(typed)
    search = [("hparams_search.", typed.hparams_search)] if typed.hparams_search is not None else []
    for prefix, node in [*options_in(typed), ("trainer.", typed.trainer), *search, ("", typed)]:
        for key, holds, allowed in node.rules():
            if not holds:
                full_key = key if "." in key else prefix + key
                value = OmegaConf.select(cfg, full_key)
                raise ConfigError(f"{full_key}={_format(value)} is not allowed: expected {allowed}")
    return typed


# Keys that change how a run is executed or reported, not what it computes: a relaunch may change them.
VOLATILE_KEYS = (
    "logger",
    "dry_run",
    "hparams_search",
    "data.root",
    "data.num_workers",
    "data.download",
    "data.cache_dir",
    "trainer.log_every",
    "trainer.device",
    "trainer.threads",
    "trainer.keep_last",
    "trainer.save_best",
)


# Keys added after runs were made, with the value that does what runs did before the key existed: a run
# made before then has the same experiment's hash as one that sets the key to that value, so it still resumes.
ADDED_KEYS: dict[str, Any] = {
    "data.resample": "auto",
    "data.crop": "random_resized",
    "data.crop_padding": 4,
    "data.limit_batches": None,
    "trainer.samples": None,
    "trainer.ema_decay": 0.0,
    "trainer.ema_warmup": False,
    "trainer.swa_start": None,
    "trainer.swa_lr": None,
    "trainer.swa_anneal_epochs": 0,
    "trainer.early_stop_patience": 0,
    "trainer.early_stop_metric": "val/acc",
    "trainer.early_stop_min_delta": 0.0,
    "trainer.sync_bn": False,
    "optim.backbone_lr_scale": 1.0,
    "model.drop_path": 0.0,
    "model.code_size": None,
    "model.freeze": "none",
    "loss": "ce",
    "probe": {"name": "none", "every": 1, "max_train": 2000},
}


def semantic_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without VOLATILE_KEYS (nor ADDED_KEYS at their old behaviour): what must match for two runs
    to be the same experiment."""
    clean = json.loads(json.dumps(config))
    for key in VOLATILE_KEYS + tuple(key for key, old in ADDED_KEYS.items() if _lookup(clean, key) == old):
        *parents, leaf = key.split(".")
        node = clean
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return clean


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(semantic_config(config), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, for an error a user can act on."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs
