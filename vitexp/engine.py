"""The training run: build data, augmentation, model and optimizer from the config, train, test, save.

A plain PyTorch loop. Checkpoints (`last.pt` every epoch, `best.pt` on validation accuracy) hold every
piece of state, so a run started again in the same directory continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import TensorDataset
from tqdm import tqdm

from vitexp import checkpoint
from vitexp.augment import BatchAugment
from vitexp.cluster import PreemptionHandler
from vitexp.config import Config, ConfigError, DataConfig, config_diff, config_hash, semantic_config, validate
from vitexp.data import DeviceData, EpochOrder, PolicyImages, SampleSeeds, Splits, build_splits, make_loader
from vitexp.logger import RESULTS_FILE, RunLogger, read_jsonl, write_json
from vitexp.metrics import DataWait, EvalMeter, RunningMeans
from vitexp.models import build_model, count_parameters, param_groups
from vitexp.sweep import FAILED_FILE, LOCK_FILE, sweep_group

log = logging.getLogger("vitexp")

GROUPS = ("model", "aug", "data", "optim", "sched", "logger")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the run stops before any NaN weight is saved."""


class RunConflictError(RuntimeError):
    """The run directory holds work of a different config; refusing to mix them."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # micro-batches of that epoch already trained
    step: int = 0  # optimizer steps, applied or skipped as non-finite (the LR schedule counts both)
    best_acc: float = -1.0
    best_epoch: int = -1
    nonfinite_streak: int = 0
    nonfinite_total: int = 0


SPLITS = ("train", "val", "test")
DEVICE_MEMORY_SHARE = 0.3  # auto keeps data on the GPU only while it takes at most this share of free memory
DATA_WAIT_WARNING = 0.2  # an epoch that waited for data longer than this share of its time gets a hint


def keep_on_device(data: DataConfig, splits: Splits, device: torch.device) -> bool:
    """Whether the splits live on the training device (batches by indexing) instead of behind a DataLoader."""
    mode = data.on_device.lower()
    in_memory = all(isinstance(getattr(splits, name), TensorDataset) for name in SPLITS)
    if mode == "false" or data.policy != "none":
        return False
    if not in_memory:
        if mode == "true":
            raise ConfigError("data.on_device=true is not allowed with data.cache=false: the images are not in memory")
        return False
    if mode == "true" or device.type != "cuda":
        return True
    size = sum(t.nelement() * t.element_size() for name in SPLITS for t in getattr(splits, name).tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if size > DEVICE_MEMORY_SHARE * free:
        log.info(
            "data (%.1f GB) stays in host memory: more than %d%% of free GPU memory",
            size / 1e9,
            DEVICE_MEMORY_SHARE * 100,
        )
        return False
    return True


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} is not allowed: no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: bf16 where the GPU has it, else fp16; CPU runs fp32 by default."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 is not allowed on CPU: use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One run in one directory: `fit()` trains (resuming if `last.pt` is there), tests and writes results."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        config: dict[str, Any],
        choices: dict[str, str],
        preemption: PreemptionHandler | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.config, self.choices = cfg, run_dir, config, choices
        self.preemption = preemption
        self.hash = config_hash(config)
        self.device = select_device(cfg.trainer.device)
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, self.device)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        checkpoint.seed_everything(cfg.seed)

        data = cfg.data
        self.splits = build_splits(data)
        self.num_classes = self.splits.num_classes
        pin = self.device.type == "cuda"
        micro_batches = len(self.splits.train) // data.batch_size // cfg.trainer.accumulate * cfg.trainer.accumulate
        if micro_batches == 0:
            raise ConfigError(
                f"data.batch_size={data.batch_size} x trainer.accumulate={cfg.trainer.accumulate} is more than the "
                f"{len(self.splits.train)} training images: lower them"
            )
        self.order = EpochOrder(len(self.splits.train), data.batch_size, micro_batches, seed=cfg.seed)
        self.resident = keep_on_device(data, self.splits, self.device)
        if self.resident:
            self.device_data = {name: DeviceData(getattr(self.splits, name), self.device) for name in SPLITS}
        else:
            train, sampler = self.splits.train, self.order
            if data.policy != "none":
                train, sampler = PolicyImages(train, data.policy, data.name), SampleSeeds(self.order)
            self.loaders = {
                "train": make_loader(train, data.batch_size, data, sampler, pin),
                "val": make_loader(self.splits.val, data.eval_batch_size, data, None, pin),
                "test": make_loader(self.splits.test, data.eval_batch_size, data, None, pin),
            }
        self.steps_per_epoch = micro_batches // cfg.trainer.accumulate

        self.augment = BatchAugment(data, cfg.aug, self.num_classes, cfg.smoothing, self.device, seed=cfg.seed + 1)
        torch.manual_seed(cfg.seed)  # the same initial weights whatever the data or augmentation
        self.model = build_model(cfg.model, self.num_classes, data.img_size).to(self.device)
        self.channels_last = cfg.trainer.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.trainer.compile else self.model
        self.params = count_parameters(self.model)

        self.optimizer = self._build_optimizer()
        total = self.steps_per_epoch * cfg.trainer.epochs
        warmup = round(cfg.sched.warmup_epochs * self.steps_per_epoch) if cfg.sched.name == "cosine" else 0
        min_ratio = cfg.sched.min_lr / cfg.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            (lambda s: lr_factor(s, warmup, total, min_ratio)) if cfg.sched.name == "cosine" else (lambda s: 1.0),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.train_means = RunningMeans(self.device)
        self.nonfinite = torch.zeros(3, dtype=torch.long, device=self.device)  # total, streak, longest streak
        self.data_wait = DataWait()
        self.progress = Progress()
        self.stop_requested = False  # honoured at the next step boundary

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Fused AdamW/SGD (CPU and CUDA): one kernel per step that can also skip a non-finite step on the device."""
        optim = self.cfg.optim
        groups = param_groups(self.model, optim.weight_decay)
        if optim.name == "adamw":
            return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)
        sgd = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True)
        if optim.momentum:  # fused SGD leaves a buffer it creates on a skipped first step uninitialised
            for param in self.model.parameters():
                sgd.state[param]["momentum_buffer"] = torch.zeros_like(param)
        return sgd

    # --- checkpoints -------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "train_means": self.train_means.state_dict(),
            "augment": self.augment.state_dict(),
            "rng": checkpoint.rng_state(),
            "config": self.config,
            "config_hash": self.hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel choice is this version's, not the checkpoint's
            group["fused"], group["foreach"] = True, None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        streak = self.progress.nonfinite_streak
        self.nonfinite = torch.tensor([self.progress.nonfinite_total, streak, streak], device=self.device)
        self.train_means.load_state_dict(state["train_means"])
        self.augment.load_state_dict(state["augment"])
        checkpoint.set_rng_state(state["rng"])

    def check_same_config(self, stored: dict[str, Any], what: Path) -> None:
        if config_hash(stored) != self.hash:
            diff = "; ".join(config_diff(semantic_config(stored), semantic_config(self.config))[:5])
            raise RunConflictError(f"{what} was made with a different config ({diff}); use another run directory")

    def resume(self) -> bool:
        """Load `last.pt` if present; a corrupt or foreign one is an error, never silently ignored."""
        if not self.last_path.exists():
            return False
        state = checkpoint.load(self.last_path)
        self.check_same_config(state["config"], self.last_path)
        self.load_state_dict(state)
        self.logger.truncate_after(self.progress.epoch)
        log.info("resumed from %s at epoch %d, batch %d", self.last_path, self.progress.epoch, self.progress.batch)
        return True

    # --- training ------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int) -> bool:
        """Train the rest of `epoch`; return False if stopped early by a stop request."""
        trainer = self.cfg.trainer
        self.model.train()
        window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        bar = tqdm(
            self.data_wait.timed(self.batches("train", epoch)),
            desc=f"epoch {epoch + 1}/{trainer.epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
            initial=self.progress.batch,
            total=self.order.batches_per_epoch,
        )
        for images, labels in bar:
            images, labels = self.to_device(images, labels)
            inputs, targets = self.augment(images, labels)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.forward(inputs)
            loss = F.cross_entropy(logits.float(), targets)
            finite = torch.isfinite(loss)
            window_finite &= finite
            self.scaler.scale(loss / trainer.accumulate).backward()
            self.train_means.update(loss, logits, targets, finite)
            self.progress.batch += 1
            if self.progress.batch % trainer.accumulate == 0:
                self.optimizer_step(window_finite)
                window_finite.fill_(True)
                if self.progress.step % trainer.log_every == 0:  # the only place a step reads the device
                    self.read_nonfinite()
                if self.progress.step % trainer.log_every == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{self.train_means.compute()['loss']:.3f}")
                elif self.progress.step % trainer.log_every == 0:
                    log.info(
                        "epoch %d step %d/%d train loss %.4f lr %.2e",
                        epoch + 1,
                        self.progress.batch // trainer.accumulate,
                        self.steps_per_epoch,
                        self.train_means.compute()["loss"],
                        self.scheduler.get_last_lr()[0],
                    )
                stop = self.stop_requested or (self.preemption is not None and self.preemption.requested)
                if stop and self.progress.batch < self.order.batches_per_epoch:
                    return False
        return True

    def optimizer_step(self, finite: torch.Tensor) -> None:
        """Apply the accumulated gradients, or skip them if a loss in the window was non-finite.

        The skip happens on the device (the fused optimizer's `found_inf`, or the GradScaler's own check in
        fp16), so no step waits for the GPU; the counters are read every `log_every` steps by `read_nonfinite`.
        """
        trainer = self.cfg.trainer
        total, streak, longest = self.nonfinite.unbind()
        total.add_(~finite)
        streak.copy_(torch.where(finite, 0, streak + 1))
        longest.copy_(torch.maximum(longest, streak))
        if trainer.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), trainer.clip_grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # non-finite gradients: skipped, and the loss scale backs off
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def read_nonfinite(self) -> None:
        """Copy the device's non-finite counters into `progress` (one sync); stop if a streak got too long."""
        total, streak, longest = self.nonfinite.tolist()
        if total > self.progress.nonfinite_total:
            log.warning(
                "non-finite loss in %d steps by step %d: those steps were skipped (%d in a row now)",
                total - self.progress.nonfinite_total,
                self.progress.step,
                streak,
            )
        self.progress.nonfinite_total, self.progress.nonfinite_streak = total, streak
        if longest >= self.cfg.trainer.max_nonfinite:
            raise NonFiniteLossError(
                f"loss was non-finite for {longest} consecutive steps "
                f"(trainer.max_nonfinite={self.cfg.trainer.max_nonfinite}); stopping without saving NaN weights. "
                "Try a lower optim.lr or trainer.clip_grad_norm, or trainer.precision=fp32"
            )

    @torch.inference_mode()
    def batches(self, split: str, epoch: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """A split's batches: the rest of `epoch` in its seeded order for train, storage order otherwise."""
        if split == "train":
            self.order.set_position(epoch, self.progress.batch)
        if self.resident:
            indices = self.order.indices() if split == "train" else None
            size = self.cfg.data.batch_size if split == "train" else self.cfg.data.eval_batch_size
            return self.device_data[split].batches(size, indices)
        return self.loaders[split]

    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        meter = EvalMeter(self.num_classes, self.device)
        for images, labels in self.batches(split):
            images, labels = self.to_device(images, labels)
            inputs = self.augment.eval_batch(images)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.forward(inputs)
            meter.update(logits, labels)
        return meter.compute()

    def save_last(self) -> None:
        self.read_nonfinite()
        checkpoint.save(self.last_path, self.state_dict())

    def fit(self, logger: RunLogger) -> dict[str, Any]:
        self.logger = logger
        started = time.perf_counter()
        log.info(
            "model %s: %s parameters; %d train / %d val / %d test images; device %s, %s",
            self.choices.get("model", self.cfg.model.name),
            f"{self.params:,}",
            len(self.splits.train),
            len(self.splits.val),
            len(self.splits.test),
            self.device,
            str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32",
        )
        self.resume()
        train_time = train_images = 0.0
        epoch_times = []
        for epoch in range(self.progress.epoch, self.cfg.trainer.epochs):
            epoch_start, start_batch = time.perf_counter(), self.progress.batch
            self.data_wait = DataWait()
            if not self.train_epoch(epoch):
                self.save_last()
                log.info("stopped at epoch %d batch %d; checkpoint saved", epoch + 1, self.progress.batch)
                return {}
            seconds = time.perf_counter() - epoch_start
            train_time += seconds
            train_images += (self.progress.batch - start_batch) * self.cfg.data.batch_size
            epoch_times.append(seconds)
            row = self.end_epoch(epoch, seconds)
            logger.log_epoch(row)
            self.save_last()
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1fs)",
                epoch + 1,
                self.cfg.trainer.epochs,
                row["train/loss"],
                row["train/acc"],
                row["val/loss"],
                row["val/acc"],
                seconds,
            )
        return self.finish(logger, time.perf_counter() - started, train_images / max(train_time, 1e-9), epoch_times)

    def end_epoch(self, epoch: int, seconds: float) -> dict[str, Any]:
        self.read_nonfinite()  # before best.pt can be written
        train = self.train_means.compute()
        val = self.evaluate("val")
        self.train_means.reset()
        self.progress.epoch, self.progress.batch = epoch + 1, 0
        if val["acc"] > self.progress.best_acc:
            self.progress.best_acc, self.progress.best_epoch = val["acc"], epoch + 1
            checkpoint.save(
                self.best_path,
                {"model": self.model.state_dict(), "epoch": epoch + 1, "val": val, "config": self.config},
            )
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.progress.step, "lr": self.scheduler.get_last_lr()[0]}
        row |= {f"train/{k}": v for k, v in train.items()} | {f"val/{k}": v for k, v in val.items()}
        data_wait = self.data_wait.seconds / max(seconds, 1e-9)
        row |= {"epoch_time_s": seconds, "data_wait": data_wait, "nonfinite_steps": self.progress.nonfinite_total}
        if data_wait > DATA_WAIT_WARNING and not self.resident:
            log.warning(
                "epoch %d waited for DataLoader batches %.0f%% of its time: raise data.num_workers, or keep the "
                "data on the device (data.cache=true, data.policy=none)",
                epoch + 1,
                data_wait * 100,
            )
        return row

    def finish(self, logger: RunLogger, wall: float, img_per_s: float, epoch_times: list[float]) -> dict[str, Any]:
        best = checkpoint.load(self.best_path)
        self.model.load_state_dict(best["model"])
        test = self.evaluate("test")
        rows = read_jsonl(logger.metrics_path)
        results = {
            "test": test,
            "best_epoch": best["epoch"],
            "best_val": best["val"],
            "params": self.params,
            "epochs": self.cfg.trainer.epochs,
            "wall_time_s": wall,
            "epoch_time_s": mean_of(rows, "epoch_time_s"),
            "data_wait": mean_of(rows, "data_wait"),
            "train_img_per_s": img_per_s if epoch_times else None,
            "nonfinite_steps": self.progress.nonfinite_total,
            "choices": self.choices,
            "smoothing": self.cfg.smoothing,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "config_hash": self.hash,
        }
        write_json(self.run_dir / RESULTS_FILE, results)
        logger.log_results(results)
        log.info(
            "test (best epoch %d): acc %.4f  acc5 %.4f  f1 %.4f  ece %.4f  nll %.4f",
            best["epoch"],
            test["acc"],
            test["acc5"],
            test["f1"],
            test["ece"],
            test["loss"],
        )
        return results


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the epoch rows that have it (a run resumed across versions may lack it)."""
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None


def finished_results(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The results of a finished run in `run_dir` with this config; refuse one with another config."""
    path = run_dir / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if results.get("config_hash") != config_hash(config):
        raise RunConflictError(f"{run_dir} already holds a finished run of a different config; use another directory")
    return results


@dataclass
class RunIdentity:
    """How a run is named in W&B: the job's overrides, the sweep's group, the model as job type."""

    choices: dict[str, str]
    name: str = ""
    group: str | None = None


def run(cfg: DictConfig, run_dir: Path, identity: RunIdentity, preemption: PreemptionHandler | None = None) -> dict:
    """Validate, then train and test in `run_dir`; a finished run there is returned, not redone.

    Returns the results, or {} when a preemption signal stopped it after a checkpoint.
    """
    typed = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
        lock.acquire()
    except Timeout:
        raise RunConflictError(f"{run_dir} is in use by another running job; refusing to write into it") from None
    try:
        done = finished_results(run_dir, config)
        if done is not None:
            log.info("%s already finished (test acc %.4f); not training again", run_dir, done["test"]["acc"])
            return done
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        return _train(typed, run_dir, config, identity, preemption)
    finally:
        lock.release()


def _train(
    typed: Config, run_dir: Path, config: dict[str, Any], identity: RunIdentity, preemption: PreemptionHandler | None
) -> dict[str, Any]:
    choices = identity.choices
    trainer = Trainer(typed, run_dir, config, choices, preemption)
    wandb_config = config | {f"{group}_config": config[group] for group in ("model", "aug", "data")}
    wandb_config |= {group: choices.get(group, config[group]["name"]) for group in ("model", "aug", "data")}
    wandb_config["params"] = trainer.params
    name = identity.name or ",".join(f"{group}={choices[group]}" for group in ("model", "aug") if group in choices)
    logger_cfg = typed.logger
    if logger_cfg.group is None and identity.group:
        logger_cfg.group = identity.group
    logger = RunLogger(logger_cfg, run_dir, wandb_config, name=name, job_type=choices.get("model", typed.model.name))
    try:
        results = trainer.fit(logger)
    except BaseException:
        logger.finish(exit_code=1)
        raise
    logger.finish(exit_code=0)
    return results


def identity_from_hydra() -> RunIdentity:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    choices = {group: str(hydra_cfg.runtime.choices[group]) for group in GROUPS if group in hydra_cfg.runtime.choices}
    name = ",".join(o for o in hydra_cfg.overrides.task if not o.startswith(("+sweep=", "sweep=", "logger")))
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:  # all jobs of a sweep share one W&B group
        group = sweep_group(hydra_cfg, Path(hydra_cfg.sweep.dir))
    return RunIdentity(choices, name, group)


def main(cfg: DictConfig) -> float:
    """Hydra task: one run in Hydra's output directory; returns the test accuracy.

    A single run ends a config error with one line and exit status 2. A sweep job records any error in
    `failed.json` and returns, so the other jobs run and the sweep's end lists every failure.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    with PreemptionHandler() as preemption:
        try:
            results = run(cfg, run_dir, identity_from_hydra(), preemption)
        except (ConfigError, RunConflictError) as err:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                return record_failure(run_dir, err)
            log.error("%s", err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                log.exception("job failed")
                return record_failure(run_dir, err)
            raise
        if not results:
            preemption.requeue()
    return float(results["test"]["acc"])


def record_failure(run_dir: Path, err: BaseException) -> float:
    message = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    write_json(run_dir / FAILED_FILE, {"error": message})
    return float("nan")
