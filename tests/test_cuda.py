"""The CUDA path on a real GPU: `pytest -m cuda` (skipped without one; `scripts/gpu-check.sh` runs it).

Collected everywhere, so it cannot rot unnoticed; each test states what it proves on the GPU that the CPU
tests (tests/test_gpu_path.py) cannot: device kernels, mixed precision on the device, no host syncs in the
step loop, memory, compile and channels-last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY
from tests.test_ddp import BASE, max_difference, torchrun, weights
from vitexp import run
from vitexp.bench_trainer import train_flops
from vitexp.config import validate
from vitexp.engine import Trainer
from vitexp.models import MODELS
from vitexp.run import RunIdentity

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SYNTHETIC = ["data=synthetic", "logger=none", "trainer.device=cuda", "aug=cutmix"]
PEAK_MEMORY_GIB = 16.0  # ViT-S/16, 224 px, batch 128, bf16: one training step plus a validation pass
MODEL_SHAPES = {"vit": [*TINY[:4], "data.img_size=32", "data.crop_pct=1.0"], "resnet18": ["data.img_size=32"]}


def trainer_of(make_cfg, run_dir: Path, *overrides: str) -> Trainer:
    cfg = make_cfg(*SYNTHETIC, *overrides)
    return Trainer(validate(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True), {})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", sorted(option.name for option in MODELS))
def test_one_training_step_per_model_and_precision(make_cfg, tmp_path: Path, model: str, precision: str) -> None:
    shape = MODEL_SHAPES.get(model, ["data.img_size=32"])
    trainer = trainer_of(make_cfg, tmp_path, f"model={model}", *shape, f"trainer.precision={precision}")
    assert trainer.feed.resident and trainer.feed.device_data["train"].images.is_cuda  # on-device data
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_steps(2)
    trainer.read_nonfinite()
    assert trainer.progress.nonfinite_total == 0
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped on the device
    assert all(torch.isfinite(w).all() for w in after.values())
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_the_step_loop_never_waits_for_the_gpu(make_cfg, tmp_path: Path) -> None:
    """Between log points, a training step queues work and moves on: any host sync raises here."""
    trainer = trainer_of(make_cfg, tmp_path, *MODEL_SHAPES["vit"], "trainer.log_every=1000")
    trainer.train_steps(2)  # warm-up: kernel selection and allocator growth may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_steps(8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_peak_memory_of_a_vit_small_step_and_evaluation(make_cfg, tmp_path: Path) -> None:
    trainer = trainer_of(make_cfg, tmp_path, "model=vit_small", "data.batch_size=128", "trainer.precision=bf16")
    torch.cuda.reset_peak_memory_stats()
    trainer.train_steps(1)
    trainer.evaluate("val")
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak memory, ViT-S/16 224 px batch 128 step + evaluation: {peak:.2f} GiB")
    assert peak < PEAK_MEMORY_GIB


def test_compile_and_channels_last_train_like_eager(make_cfg, tmp_path: Path) -> None:
    results = {}
    for name, flags in {"eager": [], "compiled": ["trainer.compile=true"]}.items():
        trainer = trainer_of(make_cfg, tmp_path / name, *MODEL_SHAPES["vit"], "trainer.precision=fp32", *flags)
        trainer.train_steps(4)
        results[name] = trainer.train_means.compute()["loss"]
    assert results["compiled"] == pytest.approx(results["eager"], rel=1e-2)
    resnet = trainer_of(make_cfg, tmp_path / "resnet", "model=resnet18", "data.img_size=32")
    assert resnet.channels_last and resnet.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    resnet.train_steps(2)


def test_mfu_of_vit_small_is_measured(make_cfg, tmp_path: Path) -> None:
    trainer = trainer_of(make_cfg, tmp_path, "model=vit_small", "data.batch_size=128", "trainer.precision=bf16")
    trainer.train_steps(3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_steps(10)
    torch.cuda.synchronize()
    step = (time.perf_counter() - start) / 10
    flops = train_flops(trainer.model, 224, trainer.device) * 128
    print(f"ViT-S/16 bf16 eager: {128 / step:,.0f} img/s, {flops / step / 1e12:.1f} TFLOP/s")
    assert flops / step > 1e12  # a GPU, not a silent CPU fallback


GPU_FP32 = ["trainer.device=cuda", "trainer.precision=fp32"]
RESNET = ["model=resnet18", "data=digits", "data.img_size=32", "data.crop=squash", "aug=none", "logger=none"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl_train_the_weights_of_one_gpu(make_cfg, tmp_path: Path) -> None:
    """DDP on NCCL: each rank on its own GPU, gradients all-reduced on the devices, the same run as one GPU's
    (a looser tolerance than gloo's: the GPU's reductions round in their own orders)."""
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun(two, *GPU_FP32)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device cuda:0" in (two / "train.log").read_text()
    results = run.run(make_cfg(*BASE, *GPU_FP32), one, RunIdentity({}))
    assert max_difference(weights(two), weights(one)) < 1e-4
    tested = json.loads((two / "results.json").read_text())["test"]
    assert tested == pytest.approx(results["test"], abs=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_sync_batchnorm_normalises_over_the_global_batch(make_cfg, tmp_path: Path) -> None:
    """With trainer.sync_bn=true, two ranks' BatchNorm sees the global batch, as one GPU's does."""
    two, one = tmp_path / "two", tmp_path / "one"
    overrides = [*RESNET, *GPU_FP32, "trainer.epochs=1", "data.batch_size=64"]
    done = torchrun(two, *overrides, "trainer.sync_bn=true", base=[])
    assert done.returncode == 0, done.stderr[-3000:]
    run.run(make_cfg(*overrides, "trainer.sync_bn=true"), one, RunIdentity({}))  # one process: plain BatchNorm
    assert max_difference(weights(two), weights(one)) < 5e-3  # cuDNN's convolution gradients add up in any order
