"""The training loop: build data, augmentation, model and optimizer from the config, train, test, save.

A plain PyTorch loop. `last.pt` (every epoch, and at a stop request) holds every piece of training state,
so a run started again in the same directory continues exactly where it stopped; `best.pt` holds the
weights of the best validation epoch, which the test runs on. No checkpoint ever holds non-finite weights.

Over 400 lines, and `Trainer` over 200, on purpose: the loop, the state a checkpoint must hold and the
`Hook` extension points that receive the trainer read top to bottom in one place, as nanoGPT's train.py
does. Everything that is not the loop is built elsewhere: batches (`feed`), optimizer and schedule
(`optim`), device and precision (`device`), non-finite guards (`guard`), evaluation (`metrics`), the run
directory (`rundir`) and where numbers go (`logger` sinks).

On several processes (`distributed`) the same loop runs on every rank under DDP: each trains its slice of the
global batch, the ranks agree on every decision (skip a step, stop here), and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vitexp import checkpoint
from vitexp.augment import BatchAugment
from vitexp.cluster import StopSignals
from vitexp.config import Config, ConfigError, config_hash
from vitexp.data import build_splits
from vitexp.device import autocast, autocast_dtype, plan_threads, select_device
from vitexp.distributed import ProcessGroup, rank_seed
from vitexp.feed import Feed
from vitexp.guard import NonFiniteError, NonFiniteSteps, check_weights
from vitexp.logger import METRICS_FILE, MetricsFiles, Sink, Sinks, read_jsonl
from vitexp.metrics import DataWait, RunningMeans, evaluate
from vitexp.models import build_model, count_parameters
from vitexp.optim import OPTIMIZERS, build_schedule

log = logging.getLogger("vitexp")


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
    # Time spent by all invocations up to this checkpoint, so a resumed run reports the whole run.
    wall_seconds: float = 0.0
    train_seconds: float = 0.0  # in training steps, of which `epoch_seconds` in the unfinished epoch
    train_images: int = 0
    epoch_seconds: float = 0.0
    epoch_wait_seconds: float = 0.0


# The training losses (`loss=`), of the logits and the (possibly mixed and smoothed) soft targets.
LOSS_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": F.cross_entropy,
    "l2": F.mse_loss,  # seed 001's: the mean squared distance between the target and the network's output
}

DATA_WAIT_WARNING = 0.2  # an epoch that waited for data longer than this share of its time gets a hint


class Hook:
    """A part of training that is not the loop itself, called at the loop's extension points in list order.

    The EMA (`vitexp.averaging`) is one: `start` copies the weights, `after_step` updates the average,
    `after_epoch` validates it, `finish` tests it and `state_dict` checkpoints it; SWA does the same from a
    start epoch. Early stopping (`vitexp.stopping`) sets `trainer.finish_early` in `after_epoch`, and a hook
    whose weights should replace the trained ones everywhere returns them from `eval_model`. The defaults
    do nothing.
    """

    def start(self, trainer: Trainer) -> None:
        """When `fit` starts training, after a resumed run's state is loaded."""

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step (applied or skipped: `trainer.step_finite` says which)."""

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After an epoch's validation, with its metrics row, before `last.pt` is written."""

    def finish(self, trainer: Trainer, results: dict[str, Any]) -> None:
        """After the test, before results.json is written: add this hook's own results."""

    def eval_model(self, trainer: Trainer) -> nn.Module | None:
        """A model to validate, save as best.pt and test instead of the trained one, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; called on resume."""


class DataWaitWarning(Hook):
    """Warn when an epoch waited for DataLoader batches more than `DATA_WAIT_WARNING` of its time."""

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if row["data_wait"] > DATA_WAIT_WARNING and not trainer.feed.resident:
            log.warning(
                "epoch %d waited for DataLoader batches %.0f%% of its time: raise data.num_workers, or keep the "
                "data on the device (data.cache=true, data.policy=none)",
                row["epoch"],
                row["data_wait"] * 100,
            )


class Trainer:
    """One run in one directory: `fit()` trains (from a checkpoint's state if given), tests, writes results."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        config: dict[str, Any],
        choices: dict[str, str],
        stop: StopSignals | None = None,
        hooks: Sequence[Hook] = (),
        launcher_cpus: int | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.config, self.choices = cfg, run_dir, config, choices
        self.stop = stop
        self.hooks = [DataWaitWarning(), *hooks]
        self.hash = config_hash(config)
        # several processes (DDP, started by the caller): rank 0 alone writes `run_dir`, the ranks agree on the rest
        self.group = group or ProcessGroup()
        self.device = self.group.device(select_device(cfg.trainer.device))
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, self.device)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        checkpoint.seed_everything(cfg.seed)

        data = cfg.data
        self.splits = build_splits(data)
        self.num_classes = self.splits.num_classes
        # Every epoch trains the same micro-batches, a multiple of each accumulation factor it may use.
        factors = math.lcm(*cfg.trainer.accumulate_factors)
        self.micro_batches = len(self.splits.train) // data.batch_size // factors * factors
        if self.micro_batches == 0:
            limit = f" (data.limit_batches={data.limit_batches} kept them)" if data.limit_batches else ""
            raise ConfigError(
                f"data.batch_size={data.batch_size} x trainer.accumulate={cfg.trainer.accumulate} is more than the "
                f"{len(self.splits.train)} training images{limit}: lower them"
            )
        self.epochs = cfg.trainer.epochs
        if cfg.trainer.samples is not None:  # as many epochs as it takes to train on that many images
            self.epochs = math.ceil(cfg.trainer.samples / (self.micro_batches * data.batch_size))
        self.threads = plan_threads(cfg.trainer.threads, launcher_cpus, data.num_workers)
        feed_data = replace(data, num_workers=self.threads.workers)
        rank, world_size = self.group.rank, self.group.world_size
        self.feed = Feed(self.splits, feed_data, self.device, self.micro_batches, cfg.seed, rank, world_size)
        if (threads := self.threads.training_threads(loaders=not self.feed.resident)) is not None:
            torch.set_num_threads(threads)
        self.epoch_steps = [self.micro_batches // cfg.trainer.accumulate_at(e) for e in range(self.epochs)]

        augment_seed = rank_seed(cfg.seed + 1, rank)  # each rank draws its own slice's augmentation
        self.augment = BatchAugment(data, cfg.aug, self.num_classes, cfg.smoothing, self.device, seed=augment_seed)
        torch.manual_seed(cfg.seed)  # the same initial weights whatever the data or augmentation
        self.model = build_model(cfg.model, self.num_classes, data.img_size).to(self.device)
        if rank:  # its own dropout masks, from the same initial weights
            torch.manual_seed(rank_seed(cfg.seed, rank))
        self.channels_last = cfg.trainer.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.trainer.compile else self.model
        self.ddp = self.wrap_ddp() if self.group.active else None
        self.params = count_parameters(self.model)

        self.optimizer = OPTIMIZERS.build(cfg.optim, self.model)
        self.scheduler = build_schedule(cfg.sched, self.optimizer, cfg.optim.lr, self.epoch_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.train_means = RunningMeans(self.device, self.group.sum)
        self.nonfinite = NonFiniteSteps(self.device, cfg.trainer.max_nonfinite)
        self.data_wait = DataWait()
        self.progress = Progress()
        self.step_finite = torch.ones((), dtype=torch.bool, device=self.device)  # the last step was applied
        self.stop_requested = False  # honoured at the next step boundary
        self.finish_early: str | None = None  # set by a hook, saying why: no more epochs, test and finish
        self.sinks: Sink = Sinks([])  # where `fit` sends its numbers

    def wrap_ddp(self) -> DistributedDataParallel:
        """The model as DDP trains it: gradients averaged over the ranks in backward, rank 0's initial weights.

        `trainer.sync_bn` makes BatchNorm normalise over the global batch (CUDA only: `vitexp.run` refuses it on
        the CPU). Evaluation runs the bare model on each rank's shard, so it has no collectives a shard could miss.
        """
        if self.cfg.trainer.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.forward = torch.compile(self.model) if self.cfg.trainer.compile else self.model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.forward, device_ids=device_ids)

    @property
    def train_forward(self) -> nn.Module:
        """The module training steps run: DDP's wrapper on several processes, else the (compiled) model."""
        return self.forward if self.ddp is None else self.ddp

    # --- checkpoints -------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / checkpoint.LAST_FILE

    @property
    def best_path(self) -> Path:
        return self.run_dir / checkpoint.BEST_FILE

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": asdict(self.progress),
            "train_means": self.train_means.state_dict(),
            "augment": self.augment.state_dict(),
            "hooks": {type(hook).__name__: state for hook in self.hooks if (state := hook.state_dict())},
            "rng": checkpoint.rng_state(),
            "config": self.config,
            "config_hash": self.hash,
        } | self.rank_states()

    def rank_states(self) -> dict[str, Any]:
        """On several ranks, every rank's own random draws (augmentation, dropout), so a resume draws on."""
        if not self.group.active:
            return {}
        return {"ranks": self.group.gather({"augment": self.augment.state_dict(), "rng": checkpoint.rng_state()})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel choice is this version's, not the checkpoint's
            group["fused"], group["foreach"] = True, None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        self.nonfinite.restore(self.progress.nonfinite_total, self.progress.nonfinite_streak)
        if self.group.is_main:  # the run's sums so far, continued by rank 0; the others count from zero
            self.train_means.load_state_dict(state["train_means"])
        saved = state.get("hooks", {})
        if isinstance(saved, list):  # by position, as earlier versions saved them (their hooks come first still)
            saved = {type(hook).__name__: hook_state for hook, hook_state in zip(self.hooks, saved, strict=False)}
        for hook in self.hooks:  # by name: a stateless hook added or dropped (a figure, say) never breaks a resume
            if hook_state := saved.get(type(hook).__name__):
                hook.load_state_dict(hook_state)
        self.load_draws(state)

    def load_draws(self, state: dict[str, Any]) -> None:
        """This rank's random generators from a checkpoint: rank 0's are the checkpoint's own; another rank's
        are its entry in `ranks`, or (a checkpoint of fewer ranks) fresh seeds of its rank and step."""
        ranks, rank = state.get("ranks", []), self.group.rank
        if rank == 0 or rank < len(ranks):
            mine = state if rank == 0 else ranks[rank]
            self.augment.load_state_dict(mine["augment"])
            checkpoint.set_rng_state(mine["rng"])
            return
        self.augment.reseed(rank_seed(self.cfg.seed + 1, rank, self.progress.step))
        checkpoint.set_rng_state(state["rng"])  # Python's and NumPy's, then torch's own seed
        torch.manual_seed(rank_seed(self.cfg.seed, rank, self.progress.step))

    def save(self, path: Path, state: dict[str, Any]) -> None:
        """Write a checkpoint, unless the weights went non-finite: then the run fails, keeping the last good one."""
        check_weights(state["model"], self.progress.step, path.name)  # on every rank: they fail together
        if self.group.is_main:
            checkpoint.save(path, state)

    # --- training ------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int, stop_batch: int | None = None) -> bool:
        """Train the rest of `epoch` (or up to micro-batch `stop_batch`); False if a stop request ended it early."""
        trainer = self.cfg.trainer
        accumulate = trainer.accumulate_at(epoch)
        self.model.train()
        window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        bar = tqdm(
            self.data_wait.timed(self.feed.train(epoch, self.progress.batch, stop_batch)),
            desc=f"epoch {epoch + 1}/{self.epochs}",
            leave=False,
            disable=not sys.stderr.isatty(),
            initial=self.progress.batch,
            total=self.feed.order.stop_batch,
        )
        forward = self.train_forward
        for images, labels in bar:
            images, labels = self.to_device(images, labels)
            inputs, targets = self.augment(images, labels)
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with self.gradient_sync((self.progress.batch + 1) % accumulate == 0):
                with self.autocast():
                    logits = forward(inputs)
                loss = LOSS_FUNCTIONS[self.cfg.loss](logits.float(), targets)
                self.scaler.scale(loss / accumulate).backward()
            finite = torch.isfinite(loss)
            window_finite &= finite
            self.train_means.update(loss, logits, targets, finite)
            self.progress.batch += 1
            if self.progress.batch % accumulate == 0:
                self.optimizer_step(window_finite)
                window_finite.fill_(True)
                if self.progress.step % trainer.log_every == 0:  # the only device reads of the loop
                    self.read_nonfinite()
                    self.show_loss(epoch, bar, loss)
                for hook in self.hooks:
                    hook.after_step(self)
                if self.stopping() and self.progress.batch < self.feed.order.batches_per_epoch:
                    return False
        return True

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients over the ranks only in the backward of a step's `last` micro-batch."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def train_steps(self, batches: int, epoch: int = 0) -> float:
        """Train micro-batches [0, batches) of `epoch` as an epoch of that length, outside any run (nothing is
        validated, saved or logged); return the seconds spent waiting for data. The loop of `fit`, for
        benchmarks to time and range tests to probe."""
        self.progress.batch, self.data_wait = 0, DataWait()
        self.train_epoch(epoch, stop_batch=batches)
        return self.data_wait.seconds

    def show_loss(self, epoch: int, bar: tqdm, last_loss: torch.Tensor) -> None:
        """The running train loss on the progress bar, or as a log line when not on a terminal; the step's
        loss (its last micro-batch's) and learning rate to the sinks that chart steps."""
        means = self.train_means.compute(step_loss=last_loss)
        loss, lr = means["loss"], self.scheduler.get_last_lr()[0]
        self.sinks.log_step({"step": self.progress.step, "train_step/loss": means["step_loss"], "train_step/lr": lr})
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.3f}")
            return
        step = self.progress.batch // self.cfg.trainer.accumulate_at(epoch)
        line = "epoch %d step %d/%d train loss %.4f lr %.2e"
        log.info(line, epoch + 1, step, self.epoch_steps[epoch], loss, lr)

    def stopping(self) -> bool:
        """Whether a stop was requested (by a signal, or by setting `stop_requested`), on any rank: the ranks
        agree at every step, so a signal to any one of them stops all of them at the same step, and each then
        knows the signal."""
        received = self.stop.requested if self.stop is not None else None
        if not self.group.active:
            return self.stop_requested or received is not None
        requested, signum = self.group.max([int(self.stop_requested), received or 0])
        self.stop_requested = bool(requested)
        if signum and self.stop is not None:
            self.stop.agree(signum)
        return self.stop_requested or bool(signum)

    def optimizer_step(self, finite: torch.Tensor) -> None:
        """Apply the accumulated gradients, or skip them if a loss in the window or a gradient was non-finite.

        The skip happens on the device (the fused optimizer's `found_inf`, or the GradScaler's own check in
        fp16), so no step waits for the GPU; the counters are read every `log_every` steps by `read_nonfinite`.
        In fp16 an overflowing gradient is the GradScaler's business (it backs off its scale), so only a
        non-finite loss counts there.
        """
        trainer = self.cfg.trainer
        finite = self.group.all_true(finite)  # every rank applies or skips the step, as one
        if trainer.clip_grad_norm > 0:  # DDP's gradients are the ranks' average: the global norm
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), trainer.clip_grad_norm)
        elif not self.scaler.is_enabled():
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(norm)
        self.nonfinite.record(finite)
        self.step_finite = finite.clone()  # for hooks; a device bool, so reading it is up to them
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
        """Bring the device's non-finite counts into `progress` (one transfer); fails on too long a streak."""
        self.nonfinite.read_nonfinite(self.progress.step)
        self.progress.nonfinite_total, self.progress.nonfinite_streak = self.nonfinite.total, self.nonfinite.streak

    def prepare_eval(self, images: torch.Tensor) -> torch.Tensor:
        """An evaluation batch as the model takes it: center crop, normalised, in the model's memory layout."""
        inputs = self.augment.eval_batch(images)
        return inputs.contiguous(memory_format=torch.channels_last) if self.channels_last else inputs

    def evaluated_model(self) -> tuple[nn.Module, nn.Module]:
        """(the module to run, the module whose weights best.pt holds): a hook's model (an average of the
        weights, say), else the trained model (run compiled when `trainer.compile` is on)."""
        for hook in self.hooks:
            if (model := hook.eval_model(self)) is not None:
                return model, model
        return self.forward, self.model

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the evaluated model on `val` or `test`."""
        return self.evaluate_model(self.evaluated_model()[0], split)

    def evaluate_model(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics of any weights (the trained model, or a hook's average) on `val` or `test`; with `loss=l2`
        also the trained loss (`l2`) beside the NLL every run reports."""
        batches = self.feed.eval_shard(split)  # torchmetrics sums the ranks' shards up in `compute`
        self.group.share_buffers(model)
        l2 = self.cfg.loss == "l2"
        return evaluate(model, batches, self.prepare_eval, self.num_classes, self.device, self.autocast, l2=l2)

    def save_last(self) -> None:
        self.read_nonfinite()
        self.progress.wall_seconds = self.wall_before + time.perf_counter() - self.started
        self.save(self.last_path, self.state_dict())

    def fit(self, sink: Sink | None = None, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train from `state` (a `last.pt`) or from scratch, then test; {} when a stop request ended it early.

        The metrics files are always written, before `sink` (W&B, TensorBoard: `vitexp.logger`) hears of
        each epoch, so results.json exists before any service is told the result.
        """
        files = [MetricsFiles(self.run_dir)] if self.group.is_main else []
        sinks = self.sinks = Sinks([*files, *([sink] if sink is not None else [])])
        sizes = (len(self.splits.train), len(self.splits.val), len(self.splits.test))
        precision = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        model = self.choices.get("model", self.cfg.model.name)
        line = "model %s: %s parameters; %d train / %d val / %d test images; device %s, %s; %s"
        threads = self.threads.describe(loaders=not self.feed.resident)
        log.info(line, model, f"{self.params:,}", *sizes, self.device, precision, threads)
        if self.splits.selected_on_test:
            log.warning("data.val_fraction=0: the test split selects the best epoch, so test numbers are optimistic")
        if state is not None:
            self.load_state_dict(state)
            log.info("resumed from %s at epoch %d, batch %d", self.last_path, self.progress.epoch, self.progress.batch)
        sinks.start(self.progress.epoch)  # rows of epochs no checkpoint covers are trained again
        for hook in self.hooks:
            hook.start(self)
        self.started, self.wall_before = time.perf_counter(), self.progress.wall_seconds
        epochs = self.epochs
        for epoch in range(self.progress.epoch, epochs):
            if self.finish_early:  # a hook decided so before a stop interrupted the finish
                break
            start, start_batch = time.perf_counter(), self.progress.batch
            self.data_wait = DataWait()
            completed = self.train_epoch(epoch)
            self.count_time(time.perf_counter() - start, self.progress.batch - start_batch)
            if not completed:
                self.save_last()
                log.info("stopped at epoch %d batch %d; checkpoint saved", epoch + 1, self.progress.batch)
                return {}
            row = self.end_epoch(epoch)
            sinks.log_epoch(row)
            self.save_last()
            shown = (row[key] for key in ("train/loss", "train/acc", "val/loss", "val/acc", "epoch_time_s"))
            line = "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1fs)"
            log.info(line, epoch + 1, epochs, *shown)
            if self.finish_early:
                log.info("finishing after epoch %d: %s", epoch + 1, self.finish_early)
                break
            if self.stopping() and epoch + 1 < epochs:  # a stop during the epoch's last step
                log.info("stopped after epoch %d; checkpoint saved", epoch + 1)
                return {}
        return self.finish(sinks)

    def count_time(self, seconds: float, batches: int) -> None:
        """Add this invocation's training time to the run's totals (kept in checkpoints across resumes)."""
        progress = self.progress
        progress.epoch_seconds += seconds
        progress.epoch_wait_seconds += self.data_wait.seconds
        progress.train_seconds += seconds
        progress.train_images += batches * self.cfg.data.batch_size

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        self.read_nonfinite()  # before best.pt can be written
        train = self.train_means.compute()
        val = self.evaluate("val")
        self.train_means.reset()
        seconds, waited = self.progress.epoch_seconds, self.progress.epoch_wait_seconds
        self.progress.epoch, self.progress.batch = epoch + 1, 0
        self.progress.epoch_seconds = self.progress.epoch_wait_seconds = 0.0
        if val["acc"] > self.progress.best_acc and all(math.isfinite(v) for v in val.values()):
            self.progress.best_acc, self.progress.best_epoch = val["acc"], epoch + 1
            weights = self.evaluated_model()[1].state_dict()
            state = {"model": weights, "epoch": epoch + 1, "val": val, "config": self.config}
            self.save(self.best_path, state)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.progress.step, "lr": self.scheduler.get_last_lr()[0]}
        row |= {f"train/{k}": v for k, v in train.items()} | {f"val/{k}": v for k, v in val.items()}
        data_wait = waited / max(seconds, 1e-9)
        row |= {"epoch_time_s": seconds, "data_wait": data_wait, "nonfinite_steps": self.progress.nonfinite_total}
        for hook in self.hooks:
            hook.after_epoch(self, row)
        return row

    def finish(self, sinks: Sink) -> dict[str, Any]:
        """Test the best epoch's weights and write results.json, which marks the run finished."""
        if self.progress.best_epoch < 1:
            raise NonFiniteError("no epoch had finite validation metrics; there are no weights to test")
        self.group.barrier()  # rank 0 has written best.pt (and its hooks' files), which every rank tests
        best = checkpoint.load(self.best_path)
        self.evaluated_model()[1].load_state_dict(best["model"])
        test = self.evaluate("test")
        broken = [key for key, value in test.items() if not math.isfinite(value)]
        if broken:
            raise NonFiniteError(f"test metrics of best epoch ({best['epoch']}) are not finite: {', '.join(broken)}")
        rows = read_jsonl(self.run_dir / METRICS_FILE)
        progress = self.progress
        results = {
            "test": test,
            "best_epoch": best["epoch"],
            "best_val": best["val"],
            "params": self.params,
            "trainable_params": count_parameters(self.model, trainable=True),  # fewer with model.freeze=backbone
            "epochs": self.epochs,
            "wall_time_s": self.wall_before + time.perf_counter() - self.started,
            "epoch_time_s": mean_of(rows, "epoch_time_s"),
            "data_wait": mean_of(rows, "data_wait"),
            "train_img_per_s": progress.train_images / progress.train_seconds if progress.train_seconds else None,
            "nonfinite_steps": progress.nonfinite_total,
            "selected_on_test": self.splits.selected_on_test,  # the best epoch was chosen on the test split
            "classes": list(self.splits.class_names),  # label id -> name
            "choices": self.choices,
            "smoothing": self.cfg.smoothing,
            "seed": self.cfg.seed,
            "device": str(self.device),
            "config": self.config,
            "config_hash": self.hash,
        }
        for hook in self.hooks:
            hook.finish(self, results)
        sinks.log_results(results)
        shown = (test[key] for key in ("acc", "acc5", "f1", "ece", "loss"))
        log.info("test (best epoch %d): acc %.4f  acc5 %.4f  f1 %.4f  ece %.4f  nll %.4f", best["epoch"], *shown)
        return results


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the epoch rows that have it (a run resumed across versions may lack it)."""
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None
