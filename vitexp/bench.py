"""Benchmarks against what users would otherwise run: `python -m vitexp.bench --help`.

Each comparison runs both sides in this process on the same model and data and prints one markdown
row (and appends the table to `--out`):
  pipeline  one epoch of vitexp's data path (decoded once, device-resident, batched augmentation) vs a
            torchvision DataLoader + PIL transforms pipeline, same augmentations and workers, same JPEGs
  overhead  vitexp's training step (metrics, non-finite checks, scheduler) vs a bare PyTorch loop
  lightning the same training written as a LightningModule + Trainer, as the seed lab does
  model     the scratch ViT vs torchvision's VisionTransformer of identical shape, forward + backward
  wait      the share of the training step spent waiting for data, vitexp's path vs workers decoding JPEGs
  gpu       (CUDA only) real vs synthetic data throughput, and MFU (any model) against the GPU's bf16 peak
  recipe    the +experiment=vit_cifar10 recipe's images/s as shipped (AutoAugment workers) vs data on device
The rows that time vitexp's Trainer (overhead, wait, recipe, gpu) live in `bench_trainer.py`.
Options left out are sized for the device (`DEFAULTS`): every row in minutes on a small CPU, the GPU-sized
rows on CUDA. Each row says on stderr when it starts; its table row is printed as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vitexp.augment import BatchAugment
from vitexp.bench_trainer import (
    Row,
    bench_gpu,
    bench_overhead,
    bench_recipe,
    bench_wait,
    build_trainer,
    model_config,
    timed,
    timed_steps,
    write_pets_like,
)
from vitexp.config import AugConfig, ConfigError, DataConfig
from vitexp.device import device_name, select_device, synchronize
from vitexp.feed import DeviceData, EpochOrder
from vitexp.models import ViTConfig, build_model, count_parameters
from vitexp.paths import CONF_DIR
from vitexp.pets import PetsImages, cached


def bench_pipeline(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from torch.utils.data import DataLoader
    from torchvision import transforms

    data = DataConfig(img_size=args.img_size, batch_size=args.batch_size, num_workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_pets_like(Path(tmp), args.images)
        paths = sorted((root / "oxford-iiit-pet" / "images").glob("*.jpg"))
        reference = transforms.Compose(
            [
                transforms.RandomResizedCrop(args.img_size, scale=tuple(data.crop_scale), ratio=tuple(data.crop_ratio)),
                transforms.RandomHorizontalFlip(data.hflip),
                transforms.ToTensor(),
                transforms.Normalize(data.mean, data.std),
            ]
        )
        files = [(str(p), i % 37) for i, p in enumerate(paths)]

        class JpegFolder(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(files)

            def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
                return reference(Image.open(files[i][0]).convert("RGB")), files[i][1]

        loader = DataLoader(
            JpegFolder(),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
            drop_last=True,
        )

        def torchvision_epoch() -> None:
            for images, _ in loader:
                images.to(device, non_blocking=True)

        torchvision_epoch()  # start the workers and warm the page cache

        start = time.perf_counter()
        pets = PetsImages(root, "trainval", data.stored_size)
        key = {"dataset": "bench", "split": "trainval", "size": data.stored_size, "version": 0}
        split = cached(pets, root / "cache", key, args.workers)
        build = time.perf_counter() - start
        resident = DeviceData(split, device)
        augment = BatchAugment(data, AugConfig(), 37, 0.0, device, seed=0)
        order = EpochOrder(len(resident), args.batch_size, len(resident) // args.batch_size, seed=0)

        def vitexp_epoch() -> None:
            for images, labels in resident.batches(args.batch_size, order.indices()):
                augment(images, labels)

        vitexp_epoch()
        ours, baseline = float("inf"), float("inf")
        for _ in range(3):  # interleaved, so a slow spell of the machine hits both sides
            ours = min(ours, timed(device, vitexp_epoch))
            baseline = min(baseline, timed(device, torchvision_epoch))
    n = len(files) // args.batch_size * args.batch_size
    return [
        (
            "pipeline: epoch of Pets-like JPEGs",
            f"{ours:.2f} s ({n / ours:,.0f} img/s)",
            f"{baseline:.2f} s ({n / baseline:,.0f} img/s)",
            f"{baseline / ours:.1f}x faster",
            ">= 10x",
        ),
        ("pipeline: one-time decode into the cache", f"{build:.2f} s", "—", "—", "once per dataset and size"),
    ]


def bench_lightning(args: argparse.Namespace, device: torch.device) -> list[Row]:
    try:
        import lightning as L
    except ImportError:
        return [("lightning: same training as a LightningModule", "—", "not installed", "—", "pip install lightning")]
    from torch.utils.data import DataLoader, TensorDataset
    from torchmetrics import Accuracy, F1Score, MetricCollection, Precision, Recall

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args, Path(tmp), [])
        train = trainer.splits.train
        augment, classes = trainer.augment, trainer.num_classes

        class LitModel(L.LightningModule):  # as in the seed lab: torchmetrics logged every step
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model
                metrics = {
                    "accuracy": Accuracy(task="multiclass", num_classes=classes),
                    "precision": Precision(task="multiclass", num_classes=classes, average="macro"),
                    "recall": Recall(task="multiclass", num_classes=classes, average="macro"),
                    "f1": F1Score(task="multiclass", num_classes=classes, average="macro"),
                }
                self.train_metrics = MetricCollection(metrics, prefix="train_")

            def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
                images, labels = batch
                inputs, targets = augment(images, labels)
                logits = self.model(inputs)
                loss = F.cross_entropy(logits, targets)
                self.log("train_loss", loss)
                self.train_metrics(logits, labels)
                self.log_dict(self.train_metrics, on_step=True, on_epoch=False)
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        class StepClock(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_batch_start(self, *args: object) -> None:
                synchronize(device)
                self.times.append(time.perf_counter())

        clock = StepClock()
        lit = L.Trainer(
            max_steps=2 + 3 * args.steps + 1,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
            precision="bf16-mixed" if device.type == "cuda" else "32-true",
            default_root_dir=tmp,
        )
        loader = DataLoader(TensorDataset(*train.tensors), batch_size=args.batch_size, shuffle=True)
        ours, _ = timed_steps(trainer, device, args.steps)
        lit.fit(LitModel(copy.deepcopy(trainer.model)), loader)
        starts = clock.times[2:]  # after 2 warm-up steps: 3 windows of --steps steps, the fastest counts
        theirs = min(starts[(i + 1) * args.steps] - starts[i * args.steps] for i in range(3)) / args.steps
        ours = min(ours, timed_steps(trainer, device, args.steps)[0])  # before and after: a slow spell may hit either
    return [
        (
            "lightning: same training as a LightningModule",
            f"{ours * 1e3:.1f} ms/step",
            f"{theirs * 1e3:.1f} ms/step",
            f"{theirs / ours:.2f}x faster",
            ">= 1.05x",
        )
    ]


MODEL_ROW = "model: scratch ViT vs torchvision ViT (fwd+bwd)"


def bench_model(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from torchvision.models import VisionTransformer as TorchvisionViT

    cfg = model_config(args)
    if not isinstance(cfg, ViTConfig):  # torchvision's ViT is the reference for the scratch ViT only
        return [(MODEL_ROW, "—", "—", "—", f"n/a for {args.model}")]
    ours = build_model(cfg, 37, args.img_size).to(device)
    mlp = int(cfg.dim * cfg.mlp_ratio)
    theirs = TorchvisionViT(
        args.img_size, cfg.patch_size, cfg.depth, cfg.heads, cfg.dim, mlp, cfg.dropout, cfg.dropout, num_classes=37
    ).to(device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.steps):
                with autocast():
                    model(images).float().sum().backward()

        return run

    step(ours)(), step(theirs)()
    t_ours, t_theirs = float("inf"), float("inf")
    for _ in range(3):  # interleaved, so a slow spell of the machine hits both sides
        t_ours = min(t_ours, timed(device, step(ours)))
        t_theirs = min(t_theirs, timed(device, step(theirs)))
    n = args.steps * args.batch_size
    assert count_parameters(ours) == count_parameters(theirs)
    return [
        (MODEL_ROW, f"{n / t_ours:,.0f} img/s", f"{n / t_theirs:,.0f} img/s", f"{t_theirs / t_ours:.2f}x", ">= 1.0x")
    ]


BENCHMARKS = {
    "pipeline": bench_pipeline,
    "overhead": bench_overhead,
    "lightning": bench_lightning,
    "model": bench_model,
    "wait": bench_wait,
    "gpu": bench_gpu,
    "recipe": bench_recipe,  # last: it runs the recipe's own model and shape, under a header of its own
}
ABOUT = {  # the progress line of each row
    "pipeline": "vitexp's data path vs a torchvision DataLoader, one epoch of Pets-like JPEGs",
    "overhead": "vitexp's training step vs a bare PyTorch loop",
    "lightning": "vitexp's training step vs the same training in Lightning",
    "model": "the scratch ViT vs torchvision's, forward + backward",
    "wait": "data-wait share of the step, cached data vs workers decoding JPEGs",
    "gpu": "real vs synthetic data, and MFU",
    "recipe": "+experiment=vit_cifar10 as shipped vs its data on the device",
}

# The sizes each device gets when an option is not given: every row in about two minutes on a 2-core CPU
# (the small shapes of docs/benchmarks.md), the GPU-sized rows on CUDA (ViT-S/16 at 224 px, compiled).
DEFAULTS = {
    "cpu": {
        "model": "vit",
        "img_size": 32,
        "batch_size": 32,
        "steps": 20,
        "images": 512,
        "workers": 2,
        "compile": False,
    },
    "cuda": {
        "model": "vit_small",
        "img_size": 224,
        "batch_size": 128,
        "steps": 20,
        "images": 1024,
        "workers": min(8, os.cpu_count() or 1),
        "compile": True,
    },
}
# ... and where one row needs other sizes than the rest on that device: on the CPU the pipeline at 64 px
# (at 32 px the resize is nothing), and one step per timed epoch of the recipe (batch 128, seconds a step).
ROW_DEFAULTS = {"cpu": {"pipeline": {"img_size": 64, "batch_size": 64}, "recipe": {"steps": 1}}, "cuda": {}}


def benchmark_names(value: str) -> list[str]:
    """`--what`: comma-separated names of BENCHMARKS, in the order given."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(unknown) or repr(value)}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


def parser() -> argparse.ArgumentParser:
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sized = "default: set by the device"
    cli.add_argument("--what", type=benchmark_names, help=f"comma-separated: {','.join(BENCHMARKS)} (default: all)")
    cli.add_argument("--model", choices=models, help=f"a conf/model option ({sized})")
    cli.add_argument("--img-size", type=int, help=sized)
    cli.add_argument("--batch-size", type=int, help=sized)
    cli.add_argument("--steps", type=int, help=f"training steps timed per repetition ({sized})")
    cli.add_argument("--images", type=int, help=f"JPEGs in the pipeline, wait and gpu benchmarks ({sized})")
    cli.add_argument("--workers", type=int, help=f"DataLoader workers for both pipelines ({sized})")
    cli.add_argument("--device", default="auto", help="auto, cpu or cuda")
    cli.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile in the gpu and recipe benchmarks (default: on with CUDA)",
    )
    cli.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    cli.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    return cli


def row_settings(args: argparse.Namespace, device_type: str) -> dict[str, argparse.Namespace]:
    """The options each requested row runs with: those given on the command line, the rest from the
    device's defaults (and the row's own defaults on that device)."""
    sizes = "cuda" if device_type == "cuda" else "cpu"  # any other device is sized as a CPU
    settings = {}
    for name in args.what or list(BENCHMARKS):
        filled = {**DEFAULTS[sizes], **ROW_DEFAULTS[sizes].get(name, {})}
        given = {key: value for key, value in vars(args).items() if value is not None}
        settings[name] = argparse.Namespace(**{**vars(args), **filled, **given, "device": device_type})
    return settings


def header(device: torch.device, name: str, s: argparse.Namespace) -> str:
    """The settings row `name` runs with, for the header of its table."""
    steps = f"{s.steps} step{'s' if s.steps != 1 else ''}"
    if name == "recipe":  # the recipe fixes its own model, shape and data
        shape = f"`+experiment=vit_cifar10` (its own ViT, 32px, batch 128) · {steps}"
    else:
        shape = f"model {s.model} · {s.img_size}px · batch {s.batch_size} · {steps} · {s.images} JPEGs"
    compiled = " · compile" if s.compile else ""
    return f"{device_name(device)} · torch {torch.__version__} · {shape} · {s.workers} workers{compiled}"


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        device = select_device(args.device)
    except ConfigError as err:
        cli.error(str(err))
    settings = row_settings(args, device.type)
    lines: list[str] = []
    shown = None
    start = time.perf_counter()
    for i, (name, s) in enumerate(settings.items(), 1):
        title = header(device, name, s)
        if title != shown:  # a new table whenever a row runs with other settings than the one above
            table = [f"### {title}", "", "| benchmark | vitexp | baseline | ratio | target |", "|---|---|---|---|---|"]
            print(("\n" if lines else "") + "\n".join(table), flush=True)
            lines += ([""] if lines else []) + table
            shown = title
        elapsed = time.perf_counter() - start
        print(f"[bench] {name} ({i}/{len(settings)}, {elapsed:.0f} s): {ABOUT[name]} ...", file=sys.stderr, flush=True)
        for row in BENCHMARKS[name](s, device):
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    print(f"[bench] done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.out:
        with args.out.open("a") as file:
            file.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
