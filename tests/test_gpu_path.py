"""The CUDA path, run on the CPU wherever the code allows: mixed precision with a GradScaler, the memory
decision for device-resident data, and the CPU answers of every call into a CUDA-only API (`vitexp.device`)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from tests.conftest import REPO, TINY
from vitexp import checkpoint, run
from vitexp.config import ConfigError, DataConfig, config_hash, validate
from vitexp.device import (
    autocast_dtype,
    cuda_rng_state,
    device_name,
    free_memory,
    select_device,
    set_cuda_rng_state,
    synchronize,
    to_device_async,
)
from vitexp.engine import Trainer
from vitexp.feed import DEVICE_MEMORY_SHARE, DeviceData, keep_on_device
from vitexp.logger import read_jsonl
from vitexp.models import VisionTransformer
from vitexp.run import RunIdentity
from vitexp.splits import Splits

BASE = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128"]
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_precision_choices_on_either_device() -> None:
    assert autocast_dtype("auto", GPU, bf16_supported=True) == torch.bfloat16
    assert autocast_dtype("auto", GPU, bf16_supported=False) == torch.float16  # V100, T4: fp16 with a GradScaler
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp16", CPU) == torch.float16
    assert autocast_dtype("bf16", CPU) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answers of a machine without CUDA")
def test_cuda_only_calls_have_cpu_answers() -> None:
    with pytest.raises(ConfigError, match="trainer.device=cuda is not allowed: no CUDA device is available"):
        select_device("cuda")
    assert select_device("auto") == CPU
    assert free_memory(CPU) is None
    values = torch.arange(4.0)
    assert torch.equal(to_device_async(values, CPU), values)
    synchronize(CPU)  # nothing queued: returns at once
    assert cuda_rng_state() == []
    set_cuda_rng_state([])  # a GPU run's checkpoint resumed on the CPU: nothing to restore
    assert "CPU" in device_name(CPU)


def splits_of(nbytes: int) -> Splits:
    """Splits whose tensors take `nbytes` in all."""
    third = nbytes // 3
    data = {name: TensorDataset(torch.zeros(third, dtype=torch.uint8)) for name in ("train", "val", "test")}
    return Splits(**data, num_classes=2, class_names=("a", "b"))


def test_device_resident_data_when_it_fits_the_free_memory(caplog) -> None:
    splits, size = splits_of(3_000), 3_000
    fits = size / DEVICE_MEMORY_SHARE + 1
    assert keep_on_device(DataConfig(on_device="auto"), splits, free_bytes=int(fits))
    with caplog.at_level(logging.INFO):
        assert not keep_on_device(DataConfig(on_device="auto"), splits, free_bytes=int(fits) - 2)
    assert "stays in host memory: more than 30% of free GPU memory" in caplog.text
    assert keep_on_device(DataConfig(on_device="true"), splits, free_bytes=10)  # asked for: no check
    assert not keep_on_device(DataConfig(on_device="false"), splits, free_bytes=None)
    assert keep_on_device(DataConfig(on_device="auto"), splits, free_bytes=None)  # CPU: already in its memory


def test_fp16_with_a_grad_scaler_skips_an_overflowing_step_and_backs_off(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """On the CPU as on a GPU: an inf loss is skipped by the GradScaler, whose scale halves, and counted."""
    forward = VisionTransformer.forward
    calls = {"n": 0}

    def overflow_once(self, images):
        calls["n"] += self.training
        logits = forward(self, images)
        return logits * float("inf") if self.training and calls["n"] == 3 else logits

    monkeypatch.setattr(VisionTransformer, "forward", overflow_once)
    results = run.run(make_cfg(*BASE, "trainer.precision=fp16"), tmp_path / "run", RunIdentity({}))
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert results["nonfinite_steps"] == 1
    growth_interval = 2000  # GradScaler's default: no growth within this run's 20 steps
    assert state["scaler"]["scale"] == 2.0**16 / 2 and state["scaler"]["_growth_tracker"] < growth_interval
    weights = state["model"]
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 master weights
    reference = run.run(make_cfg(*BASE, "trainer.precision=fp32"), tmp_path / "fp32", RunIdentity({}))
    assert results["test"]["loss"] == pytest.approx(reference["test"]["loss"], rel=0.1)  # it trained like fp32


def test_fp16_autocast_runs_the_forward_in_half_precision(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*BASE, "trainer.precision=fp16")
    trainer = Trainer(validate(cfg), tmp_path, OmegaConf.to_container(cfg, resolve=True), {})
    assert trainer.scaler.is_enabled()
    with trainer.autocast():
        logits = trainer.model(torch.zeros(2, 3, 16, 16))
    assert logits.dtype == torch.float16


def test_the_gpu_crop_path_trains_a_cpu_run(make_cfg, tmp_path: Path) -> None:
    """`data.resample=grid_sample`: the single-`grid_sample` crop/flip/resize of a GPU run, end to end on the CPU."""
    overrides = [*BASE, "trainer.epochs=3", "sched.warmup_epochs=0.5", "optim.lr=2e-3"]
    batched = run.run(make_cfg(*overrides, "data.resample=grid_sample"), tmp_path / "batched", RunIdentity({}))
    per_image = run.run(make_cfg(*overrides), tmp_path / "per_image", RunIdentity({}))
    assert batched["test"]["acc"] > 0.5  # 10 classes: it learns
    assert batched["test"]["acc"] == pytest.approx(per_image["test"]["acc"], abs=0.1)  # as well as the CPU's path
    weights = [checkpoint.load(tmp_path / name / "last.pt")["model"] for name in ("batched", "per_image")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # another path really ran


def test_an_added_key_at_its_old_behaviour_keeps_a_runs_identity(make_cfg) -> None:
    """Runs made before `data.resample` existed resume: their config hashes as one with `resample=auto`."""
    config = OmegaConf.to_container(make_cfg(*BASE), resolve=True)
    assert isinstance(config, dict)
    before = json.loads(json.dumps(config))
    del before["data"]["resample"]
    assert config_hash(before) == config_hash(config)
    config["data"]["resample"] = "grid_sample"
    assert config_hash(before) != config_hash(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer of a machine without CUDA")
def test_the_gpu_check_says_there_is_nothing_to_check_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.md"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "no CUDA device: nothing to check" in result.stderr
    assert not out.exists()


COMPILE_TOLERANCE = 1e-3  # relative: inductor fuses and reorders float ops, so losses agree to rounding, not bits


def test_a_compiled_run_trains_and_evaluates_like_eager(make_cfg, tmp_path: Path) -> None:
    """`trainer.compile=true` on the CPU (inductor's C++ backend): the same losses as eager, within tolerance."""
    overrides = [*BASE, "trainer.epochs=1", "aug=none"]
    compiled = run.run(make_cfg(*overrides, "trainer.compile=true"), tmp_path / "compiled", RunIdentity({}))
    eager = run.run(make_cfg(*overrides), tmp_path / "eager", RunIdentity({}))
    rows = {name: read_jsonl(tmp_path / name / "metrics.jsonl")[0] for name in ("compiled", "eager")}
    for key in ("train/loss", "val/loss"):
        assert rows["compiled"][key] == pytest.approx(rows["eager"][key], rel=COMPILE_TOLERANCE), key
    assert compiled["test"]["loss"] == pytest.approx(eager["test"]["loss"], rel=COMPILE_TOLERANCE)


def test_the_channels_last_branch_trains_and_evaluates(make_cfg, tmp_path: Path) -> None:
    """The GPU's channels-last layout (on by default there), forced on a CPU trainer: same steps, same layout."""
    resnet = ["model=resnet18", "data=digits", "data.img_size=32", "data.crop_pct=1.0", "data.num_workers=0"]
    cfg = make_cfg(*resnet, "logger=none", "data.batch_size=128")
    trainer = Trainer(validate(cfg), tmp_path, OmegaConf.to_container(cfg, resolve=True), {})
    assert not trainer.channels_last  # the CPU's default
    trainer.channels_last = True
    trainer.model = trainer.forward = trainer.model.to(memory_format=torch.channels_last)
    trainer.train_steps(2)
    inputs = trainer.prepare_eval(trainer.splits.val.tensors[0][:4])
    assert inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
    assert trainer.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    in_channels_last = trainer.evaluate("val")
    trainer.channels_last = False
    trainer.model = trainer.forward = trainer.model.to(memory_format=torch.contiguous_format)
    contiguous = trainer.evaluate("val")
    assert in_channels_last["loss"] == pytest.approx(contiguous["loss"], rel=1e-4)  # a layout, not another model


def test_both_layouts_of_device_data_gather_the_same_batches() -> None:
    """A GPU keeps its images contiguous (one `index_select`), the CPU channels_last (whole NHWC images):
    the same batches either way."""
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    on_cpu = DeviceData(TensorDataset(images.clone(), torch.arange(10)), CPU)
    assert on_cpu.images.is_contiguous(memory_format=torch.channels_last)
    as_on_gpu = DeviceData(TensorDataset(images.clone(), torch.arange(10)), CPU)
    as_on_gpu.images = as_on_gpu.images.contiguous()  # the layout DeviceData keeps on CUDA
    order = torch.tensor([7, 2, 9, 0, 4, 4])
    for (a, labels_a), (b, labels_b) in zip(on_cpu.batches(3, order), as_on_gpu.batches(3, order), strict=True):
        assert torch.equal(a, b) and torch.equal(a, images[labels_a]) and torch.equal(labels_a, labels_b)
