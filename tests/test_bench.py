"""The benchmark runs end to end on CPU, sizes itself by device, answers for every model, and its FLOP count
(used for MFU) matches the ViT's maths."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from vitexp.bench import BENCHMARKS, main, parser, row_settings
from vitexp.bench_trainer import train_flops, vit_train_flops
from vitexp.models import ResNetConfig, VisionTransformer, build_model


def test_vit_flops_follow_the_formula() -> None:
    dim, depth, tokens, mlp = 64, 3, 17, 2.0
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=5, dim=dim, depth=depth, heads=4, mlp_ratio=mlp)
    per_block = (4 * dim * dim + 2 * mlp * dim * dim) * tokens + 2 * tokens * tokens * dim
    forward = depth * per_block + 3 * 8 * 8 * dim * (tokens - 1) + dim * 5
    assert vit_train_flops(model, 32) == 3 * 2 * forward


def test_bench_prints_and_records_the_pipeline_comparison(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitexp.bench",
            "--what",
            "pipeline,overhead,wait,gpu",
            "--img-size",
            "32",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--images",
            "64",
            "--workers",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("### ") and "| benchmark | vitexp | baseline | ratio | target |" in table
    speedup = re.search(r"\| pipeline: epoch of Pets-like JPEGs \| .* \| ([\d.]+)x faster \|", table)
    assert speedup and float(speedup.group(1)) > 0  # speed targets live in docs/benchmarks.md, not in tests
    overhead = re.search(r"\| overhead: .* \| ([\d.]+)x the bare loop \|", table)
    assert overhead and float(overhead.group(1)) > 0
    wait = re.search(r"\| wait: .* \| ([\d.]+)% of \d+ ms \| ([\d.]+)% of \d+ ms \(JPEGs", table)
    assert wait and all(0 <= float(share) <= 100 for share in wait.groups())
    assert "needs CUDA" in table


def test_bench_measures_the_cifar10_recipe_as_shipped(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    command = [sys.executable, "-m", "vitexp.bench", "--what", "recipe", "--steps", "1", "--workers", "1"]
    result = subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pattern = r"\| recipe: .* \| ([\d,]+) img/s \+ ([\d.]+) s per epoch .* \| ([\d,]+) img/s .* in ([\d.]+) h \|"
    row = re.search(pattern, out.read_text())
    assert row
    shipped, startup, resident, hours = (float(value.replace(",", "")) for value in row.groups())
    assert shipped > 0 and resident > 0 and hours > 0 and startup >= 0
    images = 50_000 // 128 * 128  # CIFAR-10's training images in the recipe's batches of 128

    def hours_at(speed: float, start: float) -> float:
        return 200 * (images / speed + start) / 3600

    # the table rounds img/s to a whole number and the start-up to 0.01 s: slow CPUs make that a few per cent
    assert hours_at(shipped + 0.5, startup - 0.005) - 0.005 <= hours <= hours_at(shipped - 0.5, startup + 0.005) + 0.005


def test_mfu_counts_the_flops_of_any_model() -> None:
    """ResNet-18 at 224 px: 1.82 GMACs forward (3.64 GFLOPs); training is about 3x (no input gradient)."""
    model = build_model(ResNetConfig(), num_classes=1000, img_size=224)
    flops = train_flops(model, 224, torch.device("cpu"))
    forward = 3.64e9
    assert 2.9 * forward < flops < 3.0 * forward


def test_defaults_fit_the_device_and_explicit_options_win(capsys: pytest.CaptureFixture) -> None:
    cpu = row_settings(parser().parse_args([]), "cpu")
    assert list(cpu) == list(BENCHMARKS)  # every row by default, gpu included (it says it needs CUDA)
    small = cpu["overhead"]
    assert (small.model, small.img_size, small.batch_size, small.steps, small.compile) == ("vit", 32, 32, 20, False)
    assert (cpu["pipeline"].img_size, cpu["pipeline"].batch_size, cpu["recipe"].steps) == (64, 64, 1)
    assert all(s.device == "cpu" for s in cpu.values())
    assert row_settings(parser().parse_args([]), "mps")["overhead"].img_size == 32  # other devices: CPU sizes

    cuda = row_settings(parser().parse_args([]), "cuda")
    big = cuda["gpu"]
    assert (big.model, big.img_size, big.batch_size, big.steps, big.compile) == ("vit_small", 224, 128, 20, True)
    assert (cuda["pipeline"].img_size, cuda["recipe"].steps) == (224, 20)

    given = ["--what", "recipe,pipeline", "--model", "resnet18", "--img-size", "48", "--steps", "3", "--no-compile"]
    chosen = row_settings(parser().parse_args(given), "cuda")
    assert list(chosen) == ["recipe", "pipeline"]
    for s in chosen.values():
        assert (s.model, s.img_size, s.steps, s.compile, s.batch_size) == ("resnet18", 48, 3, False, 128)

    with pytest.raises(SystemExit):
        parser().parse_args(["--what", "overhead,speed"])
    error = capsys.readouterr().err
    assert "unknown benchmark speed" in error and "choose from pipeline, overhead, lightning, model" in error


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny shapes run as fast on one thread, which a machine busy with other work does not slow down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_bench_prints_one_row_per_benchmark_for_any_model(capsys: pytest.CaptureFixture) -> None:
    tiny = ["--img-size", "32", "--batch-size", "4", "--steps", "1", "--workers", "0", "--device", "cpu"]
    main(["--what", "model,overhead,gpu", "--model", "resnet18", *tiny])
    out, err = capsys.readouterr()
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and ": " in line]
    assert [row[0] for row in rows] == [
        "| model: scratch ViT vs torchvision ViT (fwd+bwd)",
        "| overhead: training step vs a bare loop",
        "| gpu: real vs synthetic data, MFU",
    ]
    assert rows[0][1:] == ["—", "—", "—", "n/a for resnet18 |"]
    assert rows[1][3].endswith("x the bare loop") and rows[2][-1] == "needs CUDA |"
    assert "model resnet18 · 32px · batch 4 · 1 step · " in out  # the header names the settings
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("[bench] ")][:3] == [
        "[bench] model",
        "[bench] overhead",
        "[bench] gpu",
    ]

    main(["--what", "model", "--model", "vit_tiny", *tiny])  # a preset of the ViT is compared with torchvision's
    model_row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert model_row[0] == "| model: scratch ViT vs torchvision ViT (fwd+bwd)" and model_row[1].endswith(" img/s")
