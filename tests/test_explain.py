"""Attributions: each method's map has the image's shape and finds the pixels a model really reads; attention
rollout follows attention we set by hand; the command draws a grid of a real run and refuses what is no run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.conftest import REPO, TINY
from vitexp import run
from vitexp.config import ConfigError
from vitexp.explain import (
    CAPTION,
    HEADER,
    METHODS,
    PANEL,
    attention_maps,
    attention_rollout,
    attribute,
    class_ids,
    grid_size,
    main,
    normalize,
    parse_args,
    rollout_matrix,
    select_images,
    unnormalize,
)
from vitexp.models import VisionTransformer
from vitexp.run import RunIdentity

CAPTUM_METHODS = ("integrated_gradients", "saliency", "occlusion")


def tiny_vit(seed: int = 0, img_size: int = 16, patch_size: int = 4, depth: int = 2) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size, patch_size, num_classes=3, dim=16, depth=depth, heads=2, mlp_ratio=2.0)
    nn.init.normal_(model.head.weight, std=0.5)  # the head starts at zero: no gradient would reach the input
    return model.eval()


class RegionModel(nn.Module):
    """Class c's logit is a fixed positive weighting of the pixels in one square, all channels; nothing outside it
    reaches the output."""

    def __init__(self, size: int = 32, top: int = 8, left: int = 10, side: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.size, self.rows, self.cols = size, slice(top, top + side), slice(left, left + side)
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.rand(classes, 3, side, side, generator=generator) + 0.5)

    def mask(self) -> torch.Tensor:
        inside = torch.zeros(self.size, self.size, dtype=torch.bool)
        inside[self.rows, self.cols] = True
        return inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,kchw->nk", x[:, :, self.rows, self.cols], self.weight)


def test_every_method_gives_a_map_of_the_image_shape() -> None:
    vit = tiny_vit()
    inputs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2])
    for method in METHODS:
        heat = attribute(vit, inputs, targets, method, steps=8)
        assert heat.shape == (2, 16, 16), method
        assert torch.isfinite(heat).all() and (heat >= 0).all() and heat.sum() > 0, method
    region = RegionModel()
    wide = torch.randn(3, 3, 32, 32)
    for method in CAPTUM_METHODS:
        assert attribute(region, wide, torch.tensor([0, 1, 2]), method, steps=8).shape == (3, 32, 32), method


@pytest.mark.parametrize("method", CAPTUM_METHODS)
def test_attribution_lies_where_the_model_reads(method: str) -> None:
    model = RegionModel()
    inputs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) + 0.5  # bright pixels everywhere
    targets = torch.tensor([0, 1, 2])
    # Occlusion sees at the resolution of its window: a window straddling the border moves the logit and
    # credits every pixel it covers, so with the default (32 // 8 = 4 px) a ring 3 px wide shares the mass.
    heat = attribute(model, inputs, targets, method, steps=16, window=2 if method == "occlusion" else None)
    inside = heat[:, model.mask()].sum(dim=1) / heat.flatten(1).sum(dim=1)
    assert (inside > 0.9).all(), (method, inside.tolist())
    if method != "occlusion":  # gradients are exactly zero outside
        assert heat[:, ~model.mask()].max() == 0
        return
    reach = F.max_pool2d(model.mask()[None].float(), kernel_size=7, stride=1, padding=3)[0] > 0  # 3 px around
    default = attribute(model, inputs, targets, method)
    assert default[:, ~reach].max() < 1e-4 * default.max()  # nothing beyond a window's reach (float noise aside)


def attend_to_one_patch(vit: VisionTransformer, patch: int) -> None:
    """Every token of every block attends (almost) only to patch token `patch`: only that token's position
    embedding is non-zero, queries are a constant vector and keys the normalised token, so only that token's key
    meets the query; the attention and MLP branches add nothing, so every block sees the same tokens."""
    dim = vit.cls_token.shape[-1]
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.zero_()
        vit.pos_embed[0, 1 + patch] = torch.linspace(-1, 1, dim)
        for block in vit.blocks:
            nn.init.ones_(block.norm1.weight)
            qkv = block.attn.qkv
            qkv.bias[:dim] = 10 * torch.linspace(-1, 1, dim)  # q: the same for every token
            qkv.weight[dim : 2 * dim] = torch.eye(dim)  # k: the token itself (zero for every other token)


def test_rollout_follows_attention_set_by_hand() -> None:
    vit = tiny_vit(depth=3)  # 16 px, patches of 4: 16 patches and the cls token
    target = 6
    attend_to_one_patch(vit, target)
    images = torch.randn(2, 3, 16, 16)
    maps = attention_maps(vit, images)
    assert len(maps) == 3 and maps[0].shape == (2, 2, 17, 17)
    assert (maps[1][..., 1 + target] > 0.99).all()  # the control works: each row's mass on the one patch
    joint = rollout_matrix(vit, images)
    assert torch.allclose(joint.sum(dim=-1), torch.ones(2, 17), atol=1e-5)  # rows stay distributions
    cls_row = joint[:, 0, 1:]
    assert (cls_row.argmax(dim=-1) == target).all()
    assert (cls_row[:, target] / cls_row.sum(dim=-1) > 0.99).all()
    heat = attention_rollout(vit, images)  # on the pixels: that patch, rows 4-7 and columns 8-11
    patch_pixels = torch.zeros(16, 16, dtype=torch.bool)
    patch_pixels[4:8, 8:12] = True
    assert (heat[:, patch_pixels].sum(dim=1) / heat.flatten(1).sum(dim=1) > 0.99).all()


def test_recomputed_attention_is_the_one_sdpa_applied() -> None:
    vit = tiny_vit(seed=3)
    images = torch.randn(2, 3, 16, 16)
    seen: dict[str, torch.Tensor] = {}
    block = vit.blocks[1]
    qkv_hook = block.attn.qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("qkv", out))
    out_hook = block.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    attention = attention_maps(vit, images)[1]
    qkv_hook.remove()
    out_hook.remove()
    v = seen["qkv"].view(2, 17, 3, 2, 8)[:, :, 2].transpose(1, 2)  # (batch, heads, tokens, head dim)
    mixed = (attention @ v).transpose(1, 2).reshape(2, 17, 16)
    assert torch.allclose(block.attn.proj(mixed), seen["out"], atol=1e-5)


def test_rollout_refuses_a_model_that_is_no_vit() -> None:
    with pytest.raises(ConfigError, match=r"explain\.method=attention_rollout .*RegionModel"):
        attribute(RegionModel(), torch.randn(1, 3, 32, 32), torch.tensor([0]), "attention_rollout")


def test_images_classes_and_normalisation() -> None:
    assert select_images([0, 1, 0, 2, 1, 0], [0, 1, 2], 4) == [0, 1, 3, 2]  # a class each, then again
    assert select_images([0, 1, 0, 2, 1, 0], [0], 8) == [0, 2, 5]  # fewer than asked: all there are
    names = ["Abyssinian", "American Bulldog", "beagle"]
    assert class_ids("beagle,0", names) == [2, 0]
    assert class_ids("[american_bulldog, Beagle]", names) == [1, 2]
    assert class_ids(None, names) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"explain\.classes=.*'poodle' is neither"):
        class_ids("beagle,poodle", names)
    raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    assert torch.allclose(unnormalize(normalize(raw, mean, std), mean, std), raw / 255, atol=1e-6)


def test_arguments_are_checked() -> None:
    run_dir, cfg = parse_args(["runs/a", "explain.n=3", "explain.method=occlusion", "explain.classes=cat,dog"])
    assert run_dir == Path("runs/a") and (cfg.n, cfg.method, cfg.classes) == (3, "occlusion", "cat,dog")
    with pytest.raises(ConfigError, match=r"unknown key explain\.nn"):
        parse_args(["runs/a", "explain.nn=3"])
    with pytest.raises(ConfigError, match=r"explain\.method='gradcam' is not allowed"):
        parse_args(["runs/a", "explain.method=gradcam"])
    with pytest.raises(ConfigError, match=r"explain\.n='many'"):
        parse_args(["runs/a", "explain.n=many"])
    with pytest.raises(ConfigError, match="model.depth is not read by explain"):
        parse_args(["runs/a", "model.depth=2"])


def test_captum_is_not_imported_by_training_or_by_loading_explain() -> None:
    code = "import sys, vitexp.run, vitexp.explain; assert 'captum' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def panel_pixels(png: np.ndarray, cell: int, overlay: bool) -> np.ndarray:
    top = HEADER + CAPTION
    left = cell * (2 * PANEL + 12) + (PANEL if overlay else 0)
    return png[top + 5 : top + PANEL - 5, left + 5 : left + PANEL - 5].astype(float)


def test_command_draws_a_grid_of_a_real_run(make_cfg, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128"]
    run.run(make_cfg(*overrides), run_dir, RunIdentity({}))
    before = files_in(run_dir)
    main([str(run_dir), "explain.n=4", "explain.classes=3,7"])
    out = run_dir / "explain_integrated_gradients.png"
    assert set(files_in(run_dir)) == {*before, out.name}  # the PNG and nothing else
    assert all(files_in(run_dir)[name] == data for name, data in before.items())
    png = Image.open(out)
    assert png.size == grid_size(4) == (4 * 2 * PANEL + 3 * 12, HEADER + CAPTION + PANEL)  # one row of 4 cells
    pixels = np.asarray(png.convert("RGB"))
    for cell in range(4):
        image, overlay = panel_pixels(pixels, cell, False), panel_pixels(pixels, cell, True)
        assert image.std() > 20  # a digit, not a blank panel
        assert np.abs(overlay - image).mean() > 10  # the heatmap is drawn over it

    main([str(run_dir), "explain.n=5", "explain.method=attention_rollout", "explain.split=val"])
    assert Image.open(run_dir / "explain_attention_rollout.png").size == grid_size(5) == (1316, 28 + 2 * 196 + 12)

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # never overwritten unless asked
        main([str(run_dir), "explain.n=4"])
    assert refused.value.code == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == files_in(run_dir)[out.name]
    main([str(run_dir), "explain.n=1", "explain.overwrite=true"])
    assert Image.open(out).size == grid_size(1) == (2 * PANEL, HEADER + CAPTION + PANEL)


@pytest.mark.parametrize("setup", ["empty", "last_only", "missing"])
def test_a_directory_without_best_pt_is_refused(setup: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    if setup != "missing":
        run_dir.mkdir()
    if setup == "last_only":
        (run_dir / "last.pt").write_bytes(b"")
    before = files_in(tmp_path)
    with pytest.raises(SystemExit) as refused:
        main([str(run_dir), "explain.n=2", "explain.method=saliency"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(run_dir) in err[0]
    assert ("best.pt" in err[0]) if setup != "missing" else ("does not exist" in err[0])
    assert files_in(tmp_path) == before  # nothing written
