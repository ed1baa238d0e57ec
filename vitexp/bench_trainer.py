"""vitexp's Trainer on the bench: a real Trainer composed from conf/, the seconds per step of its training
loop (through `Trainer.train_steps`, the loop `fit` runs), and the rows that time it: overhead (against a
bare loop), wait, recipe and gpu, described with the others in `bench.py`, which holds the command line
and the rows against other tools. Also the pieces every row uses: timing that waits for the device, and
Pets-like JPEGs on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitexp.augment import BatchAugment
from vitexp.config import ModelConfig
from vitexp.device import synchronize
from vitexp.groups import register_schemas
from vitexp.models import VisionTransformer
from vitexp.paths import CONF_DIR

Row = tuple[str, str, str, str, str]  # benchmark, vitexp, baseline, ratio, target


def timed(device: torch.device, work: Callable[[], object]) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def write_pets_like(root: Path, n: int) -> Path:
    """`n` JPEGs of Pets' typical size (~500x375) in the real Oxford-IIIT Pet layout, 37 breeds."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    ramp = np.linspace(0, 1, 500)[None, :, None]
    for i in range(n):
        label = i % 37 + 1
        colour = rng.integers(0, 256, 3)
        pixels = colour * (0.5 + 0.5 * ramp) + rng.normal(0, 12, (375, 500, 3))
        name = f"breed{label}_{i}"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(base / "images" / f"{name}.jpg", quality=90)
        lines.append(f"{name} {label} 1 1")
    for split in ("trainval", "test"):
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (base / ".vitexp-complete").write_text("ok\n")
    return root


def build_trainer(args: argparse.Namespace, run_dir: Path, overrides: list[str], data: str = "data=synthetic"):
    """A real vitexp Trainer (composed from conf/), by default on synthetic data, sized by the benchmark options."""
    shape = [f"model={args.model}", f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}", "aug=none"]
    return compose_trainer(args, run_dir, [*shape, data, "trainer.clip_grad_norm=0", *overrides])


def compose_config(args: argparse.Namespace, overrides: list[str]):
    """The config composed from conf/ with these overrides, on the benchmark's device: (typed, raw)."""
    from hydra import compose, initialize_config_dir

    from vitexp.config import validate

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["logger=none", f"trainer.device={args.device}", *overrides])
    return validate(cfg), cfg


def compose_trainer(args: argparse.Namespace, run_dir: Path, overrides: list[str]):
    """A Trainer composed from conf/ with these overrides, on the benchmark's device."""
    from omegaconf import OmegaConf

    from vitexp.engine import Trainer

    typed, cfg = compose_config(args, overrides)
    return Trainer(typed, run_dir, OmegaConf.to_container(cfg, resolve=True), {})


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The `--model` option as composed from conf/model (a preset such as vit_small included), checked
    against `--img-size`."""
    shape = [f"model={args.model}", f"data.img_size={args.img_size}", "data=synthetic"]
    return compose_config(args, shape)[0].model


def pets_trainer(args: argparse.Namespace, run_dir: Path, root: Path, overrides: list[str]):
    """A vitexp Trainer on the Pets-like JPEGs under `root`, half of them for training."""
    pets = [f"data.root={root}", "data.download=false", "data.val_fraction=0.5", *overrides]
    return build_trainer(args, run_dir, pets, data="data=pets")


def timed_steps(trainer, device: torch.device, steps: int, repeats: int = 3) -> tuple[float, float]:
    """Seconds per training step of `trainer` and the share of it spent waiting for data, for the fastest
    of `repeats` runs of `steps` steps (at most an epoch's) after a warm-up. Each run is an epoch of that
    length, so it includes the epoch's fixed start-up (a new DataLoader iterator, filling its prefetch)."""
    steps = min(steps, trainer.micro_batches)

    def run() -> tuple[float, float]:
        waits: list[float] = []
        seconds = timed(device, lambda: waits.append(trainer.train_steps(steps)))
        return seconds, waits[0] / seconds

    run()
    seconds, wait = min(run() for _ in range(repeats))
    return seconds / steps, wait


def epoch_cost(trainer, device: torch.device, steps: int) -> tuple[float, float, float]:
    """(seconds per step, fixed seconds per epoch, data-wait share) of `trainer`'s training epochs.

    The fixed part (starting an epoch's DataLoader iterator, filling its prefetch) is separated by
    timing epochs of n and 2n steps (n at most `steps`): the step cost is their difference over n.
    """
    n = min(steps, trainer.micro_batches // 2)
    short, _ = timed_steps(trainer, device, n)  # seconds per step over n steps
    long, wait = timed_steps(trainer, device, 2 * n)  # ... over 2n steps
    step = 2 * long - short  # (2n * long - n * short) / n
    if step <= 0:  # timing noise larger than a few steps' cost (a loaded machine): the longer epoch's per step
        step = long
    return step, max(0.0, n * (short - step)), wait


def train_flops(model: torch.nn.Module, img_size: int, device: torch.device) -> float:
    """Training FLOPs per image of any model, for MFU: the ViT's formula for a ViT (torch's counter misses
    attention on some backends), else torch's FLOP counter over one forward and backward pass."""
    if isinstance(model, VisionTransformer):
        return vit_train_flops(model, img_size)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size, device=device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def vit_train_flops(model: VisionTransformer, img_size: int) -> float:
    """Training FLOPs per image (forward + backward = 3x forward), matmuls only."""
    blocks = list(model.blocks)
    dim = model.pos_embed.shape[-1]
    tokens = model.pos_embed.shape[1]
    matmul_params = sum(p.numel() for b in blocks for n, p in b.named_parameters() if p.ndim == 2)
    attention = len(blocks) * 2 * tokens * tokens * dim  # q @ k and attn @ v
    patch = model.patch_embed.weight.numel() * (tokens - 1)
    return 3 * 2 * (matmul_params * tokens + attention + patch + model.head.weight.numel())


def bare_loop(
    model: torch.nn.Module,
    batches: Callable[[], Iterator],
    augment: BatchAugment,
    autocast: Callable[[], contextlib.AbstractContextManager],
    lr: float,
) -> None:
    """What a user would write by hand: the reference for vitexp's per-step overhead."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # as vitexp: compare the loops, not optimizers
    model.train()
    for images, labels in batches():
        inputs, targets = augment(images, labels)
        with autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def bench_overhead(args: argparse.Namespace, device: torch.device) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, Path(tmp), [])
        reference = copy.deepcopy(trainer.model)
        data = trainer.feed.device_data["train"]

        def batches() -> Iterator:
            return data.batches(args.batch_size, torch.arange(args.steps * args.batch_size) % len(data))

        def bare_steps() -> float:
            return timed(device, lambda: bare_loop(reference, batches, trainer.augment, trainer.autocast, 1e-3))

        bare_steps()  # warm-up
        ours, bare = float("inf"), float("inf")
        for _ in range(3):  # interleaved, so a slow spell of the machine hits both sides
            ours = min(ours, timed_steps(trainer, device, args.steps, repeats=1)[0])
            bare = min(bare, bare_steps() / args.steps)
    return [
        (
            "overhead: training step vs a bare loop",
            f"{ours * 1e3:.1f} ms/step",
            f"{bare * 1e3:.1f} ms/step",
            f"{ours / bare:.3f}x the bare loop",
            "<= 1.02x",
        )
    ]


def bench_wait(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Share of the training step spent waiting for data: vitexp's cached, device-resident path vs
    DataLoader workers decoding the JPEGs every epoch (data.cache=false), same model and workers."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_pets_like(Path(tmp) / "pets", args.images)
        workers = f"data.num_workers={args.workers}"
        ours = timed_steps(pets_trainer(args, Path(tmp) / "ours", root, [workers]), device, args.steps)
        decoder = pets_trainer(args, Path(tmp) / "decode", root, [workers, "data.cache=false"])
        decoding = timed_steps(decoder, device, args.steps)
    return [
        (
            "wait: data-wait share of the training step",
            f"{ours[1]:.1%} of {ours[0] * 1e3:.0f} ms",
            f"{decoding[1]:.1%} of {decoding[0] * 1e3:.0f} ms (JPEGs decoded by workers)",
            f"{decoding[0] / ours[0]:.2f}x faster step",
            "~0% (compute-bound)",
        )
    ]


CIFAR10_TRAIN_IMAGES, RECIPE_EPOCHS, RECIPE_GOAL_S = 50_000, 200, 600


def bench_recipe(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Training throughput of the `+experiment=vit_cifar10` recipe as shipped (AutoAugment in DataLoader
    workers), against the same model fed from the device, on CIFAR-shaped synthetic images."""
    recipe = ["+experiment=vit_cifar10", "data=synthetic", "data.img_size=32", "data.crop_pct=1.0"]
    recipe += [f"data.num_workers={args.workers}", f"trainer.compile={str(args.compile).lower()}"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = compose_trainer(args, Path(tmp) / "shipped", recipe)
        step, start, wait = epoch_cost(trainer, device, args.steps)
        resident = compose_trainer(args, Path(tmp) / "resident", [*recipe, "data.policy=none"])
        resident_step, _, _ = epoch_cost(resident, device, args.steps)
    batch = trainer.cfg.data.batch_size
    steps_per_epoch = CIFAR10_TRAIN_IMAGES // batch
    total = RECIPE_EPOCHS * (steps_per_epoch * step + start)
    return [
        (
            "recipe: vit_cifar10 training throughput",
            f"{batch / step:,.0f} img/s + {start:.2f} s per epoch of start-up "
            f"(AutoAugment, {args.workers} workers, {wait:.0%} data wait)",
            f"{batch / resident_step:,.0f} img/s (no policy, data on the device)",
            f"200 epochs in {total / 3600:.2f} h",
            f"<= 10 min on one H100 ({CIFAR10_TRAIN_IMAGES * RECIPE_EPOCHS / RECIPE_GOAL_S:,.0f} img/s)",
        )
    ]


def bench_gpu(args: argparse.Namespace, device: torch.device) -> list[Row]:
    if device.type != "cuda":
        return [("gpu: real vs synthetic data, MFU", "—", "—", "—", "needs CUDA")]
    compile_flag = ["trainer.compile=true"] if args.compile else []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = build_trainer(args, Path(tmp) / "synthetic", compile_flag)
        synthetic_step, _ = timed_steps(synthetic, device, args.steps)
        root = write_pets_like(Path(tmp) / "pets", args.images)
        real = pets_trainer(args, Path(tmp) / "real", root, compile_flag)
        real_step, real_wait = timed_steps(real, device, args.steps)
        mfu = train_flops(synthetic.model, args.img_size, device) * args.batch_size / synthetic_step
        mfu /= args.peak_tflops * 1e12
    return [
        (
            "gpu: real (Pets-like, cached) vs synthetic data",
            f"{args.batch_size / real_step:,.0f} img/s ({real_wait:.1%} data wait)",
            f"{args.batch_size / synthetic_step:,.0f} img/s",
            f"{synthetic_step / real_step:.3f}x",
            ">= 0.97x",
        ),
        (
            f"gpu: MFU ({args.model}, bf16{', compile' if args.compile else ''})",
            f"{mfu * 100:.1f}%",
            f"peak {args.peak_tflops:g} TFLOP/s",
            "—",
            ">= 35% (ViT-S/16, compile)",
        ),
    ]
