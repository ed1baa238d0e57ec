"""The maths of the batched augmentations: exact pixels, exact lambdas, targets that sum to one; and that
the newer ones (Mixup-or-CutMix, Random Erasing) draw resumably and train."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomErasing as TorchvisionRandomErasing
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from tests.conftest import TINY
from vitexp import run
from vitexp.augment import (
    AUGMENTATIONS,
    BatchAugment,
    CutMixConfig,
    CutoutConfig,
    MixupConfig,
    MixupCutMixConfig,
    RandomErasingConfig,
    box_masks,
    center_crop,
    crop_flip_resize,
    crop_flip_resize_batched,
    crop_flip_resize_per_image,
    cutmix,
    cutout,
    mixup,
    random_erasing,
    sample_crop_boxes,
    sample_erasing_boxes,
    smooth,
)
from vitexp.config import DataConfig
from vitexp.run import RunIdentity


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cutout_zeroes_exactly_the_expected_pixels() -> None:
    images = torch.rand(6, 3, 20, 24) + 1  # no pixel is zero before cutout
    n_holes, length = 2, 7
    out = cutout(images, n_holes, length, p=1.0, gen=gen(3))
    g = gen(3)  # replay the same draws to build the expected mask by hand
    cy = torch.randint(0, 20, (6, n_holes), generator=g)
    cx = torch.randint(0, 24, (6, n_holes), generator=g)
    expected = torch.zeros(6, 20, 24, dtype=torch.bool)
    for i in range(6):
        for k in range(n_holes):
            y0, y1 = max(0, cy[i, k] - length // 2), min(20, cy[i, k] + length // 2)
            x0, x1 = max(0, cx[i, k] - length // 2), min(24, cx[i, k] + length // 2)
            expected[i, y0:y1, x0:x1] = True
    assert torch.equal(out == 0, expected[:, None].expand_as(out))
    assert torch.equal(out[~expected[:, None].expand_as(out)], images[~expected[:, None].expand_as(out)])


def test_cutout_probability_zero_leaves_images_untouched() -> None:
    images = torch.rand(8, 3, 16, 16)
    assert torch.equal(cutout(images, 3, 8, p=0.0, gen=gen()), images)


def test_mixup_mixes_images_and_targets_with_the_same_lambda() -> None:
    images, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    targets = F.one_hot(labels, 10).float()
    perm = torch.tensor([4, 3, 2, 1, 0])
    x, y = mixup(images, targets, 0.3, perm)
    assert torch.allclose(x, 0.3 * images + 0.7 * images[perm])
    assert torch.allclose(y.sum(1), torch.ones(5))
    assert y[0, 0] == pytest.approx(0.3) and y[0, 4] == pytest.approx(0.7)


def test_cutmix_lambda_is_one_minus_pasted_area_per_sample() -> None:
    n, h, w = 64, 24, 32
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    targets = F.one_hot(torch.arange(n) % 10, 10).float()
    lam = torch.distributions.Beta(1.0, 1.0).sample((n,))
    applied = torch.rand(n) < 0.7
    perm = torch.roll(torch.arange(n), 1)
    x, y, lam_true = cutmix(images, targets, lam, applied, perm, gen(1))
    pasted = (x[:, 0] != images[:, 0]).float().mean(dim=(1, 2))  # every partner has a different value
    assert torch.allclose(lam_true, 1 - pasted)
    assert torch.all(lam_true[~applied] == 1)
    assert torch.allclose(y.sum(1), torch.ones(n))
    mixed_expected = lam_true[:, None] * targets + (1 - lam_true[:, None]) * targets[perm]
    assert torch.allclose(y, mixed_expected)
    # pasted pixels come from the partner, and form one rectangle
    for i in torch.nonzero(applied & (lam_true < 1)).flatten().tolist():
        mask = x[i, 0] != images[i, 0]
        assert torch.all(x[i, 0][mask] == images[perm[i], 0, 0, 0])
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask.sum() == len(rows) * len(cols)


def test_box_masks_clip_at_the_border() -> None:
    masks, area = box_masks(torch.tensor([0]), torch.tensor([9]), torch.tensor([3]), torch.tensor([3]), 10, 10)
    assert masks.shape == (1, 10, 10)
    assert area.item() == 3 * 4 == masks.sum().item()  # rows [0, 3), cols [6, 10)


def test_smoothing_gives_one_minus_eps_plus_eps_over_k_on_true_class() -> None:
    k, eps = 37, 0.1
    y = smooth(F.one_hot(torch.tensor([4, 9]), k).float(), eps)
    assert y[0, 4] == pytest.approx(1 - eps + eps / k)
    assert y[0, 0] == pytest.approx(eps / k)
    assert torch.allclose(y.sum(1), torch.ones(2))


@pytest.mark.parametrize(
    "aug",
    [
        None,
        CutoutConfig(),
        MixupConfig(alpha=0.4),
        CutMixConfig(alpha=1.0, p=1.0),
        MixupCutMixConfig(),
        RandomErasingConfig(p=1.0, mode="pixel"),
    ],
)
def test_batch_pipeline_targets_are_distributions_smoothed_once(aug) -> None:
    data = DataConfig(img_size=32, crop_pct=0.8)
    pipeline = BatchAugment(data, aug or CutoutConfig(p=0.0), 10, 0.2, torch.device("cpu"), seed=0)
    images = torch.randint(0, 256, (16, 3, data.stored_size, data.stored_size), dtype=torch.uint8)
    x, y = pipeline(images, torch.arange(16) % 10)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(y.sum(1), torch.ones(16))
    assert y.min() >= 0.2 / 10 - 1e-6  # smoothing floor applied exactly once
    assert y.max() <= 1 - 0.2 + 0.2 / 10 + 1e-6


def test_crop_scales_and_aspect_ratios_follow_the_configured_ranges() -> None:
    size, scale, ratio = 256, (0.25, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(20000, size, scale, ratio, gen(0))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0) and torch.all(x0 + w <= size) and torch.all(y0 + h <= size)
    area = w * h / size**2
    aspect = w / h
    assert area.min() >= scale[0] - 0.01 and area.max() <= 1.0
    assert aspect.min() >= ratio[0] - 0.02 and aspect.max() <= ratio[1] + 0.02
    # the same distribution as torchvision's RandomResizedCrop (rejection of boxes that do not fit included)
    torch.manual_seed(0)
    reference = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(1, size, size), list(scale), list(ratio)) for _ in range(20000)],
        dtype=torch.float32,
    )
    ref_area = reference[:, 2] * reference[:, 3] / size**2
    ref_log_aspect = torch.log(reference[:, 3] / reference[:, 2])
    assert abs(area.mean().item() - ref_area.mean().item()) < 0.01
    assert abs(area.std().item() - ref_area.std().item()) < 0.01
    assert abs(torch.log(aspect).mean().item() - ref_log_aspect.mean().item()) < 0.01
    assert abs(torch.log(aspect).std().item() - ref_log_aspect.std().item()) < 0.01


def test_flip_happens_with_configured_probability() -> None:
    data = DataConfig(
        img_size=16,
        crop_pct=1.0,
        crop_scale=[1.0, 1.0],
        crop_ratio=[1.0, 1.0],
        hflip=0.5,
        mean=[0, 0, 0],
        std=[1 / 255] * 3,
    )
    pipeline = BatchAugment(data, CutoutConfig(p=0.0), 2, 0.0, torch.device("cpu"), seed=0)
    ramp = torch.arange(16, dtype=torch.uint8).expand(4000, 3, 16, 16).contiguous()  # left to right
    x, _ = pipeline(ramp, torch.zeros(4000, dtype=torch.long))
    flipped = x[:, 0, 0, 0] > x[:, 0, 0, -1]
    assert torch.allclose(x[~flipped], ramp[~flipped].float())
    assert torch.allclose(x[flipped], ramp[flipped].flip(-1).float())
    assert abs(flipped.float().mean().item() - 0.5) < 0.03


def test_crop_flip_resize_matches_slicing_for_whole_pixel_boxes() -> None:
    images = torch.rand(2, 3, 12, 12)
    boxes = torch.tensor([[2.0, 3.0, 6.0, 6.0], [0.0, 0.0, 12.0, 12.0]])
    out = crop_flip_resize(images, boxes, torch.tensor([False, True]), out_size=6)
    assert torch.allclose(out[0], images[0, :, 3:9, 2:8], atol=1e-5)
    assert torch.allclose(out[1], F.interpolate(images[1:2].flip(-1), size=6, mode="bilinear")[0], atol=1e-5)


def test_cpu_per_image_resize_matches_the_batched_grid_sample() -> None:
    """The CPU path (uint8, image by image) and the GPU path (one grid_sample) draw the same pictures."""
    size, out_size, n = 64, 48, 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.rand(n, 3, 1, 1, generator=gen(0)) * 6
    smooth_images = 127.5 + 120 * torch.sin(xx / 20 + phase) * torch.cos(yy / 24 + phase)  # no detail to alias
    images = smooth_images.round().to(torch.uint8)
    boxes = sample_crop_boxes(n, size, (0.08, 1.0), (3 / 4, 4 / 3), gen(1))
    flip = torch.rand(n, generator=gen(2)) < 0.5
    per_image = crop_flip_resize(images, boxes, flip, out_size)
    batched = crop_flip_resize_batched(images.float(), boxes, flip, out_size)
    assert per_image.dtype == torch.uint8 and per_image.shape == batched.shape == (n, 3, out_size, out_size)
    difference = (per_image.float() - batched).abs()
    # rounding to uint8, antialiasing when shrinking, and grid_sample reading past the crop's edge
    assert difference.mean() < 0.5 and difference.max() < 4
    mirrored = crop_flip_resize_per_image(images, boxes, ~flip, out_size)
    assert torch.equal(mirrored, per_image.flip(-1))
    for i in range(n):  # and it is exactly torchvision's resized crop + flip on a uint8 tensor
        x0, y0, w, h = boxes[i].int().tolist()
        reference = TF.resized_crop(images[i], y0, x0, h, w, [out_size, out_size], antialias=True)
        assert torch.equal(per_image[i], TF.horizontal_flip(reference) if flip[i] else reference)


def test_center_crop_takes_the_middle() -> None:
    images = torch.arange(10 * 10).view(1, 1, 10, 10)
    assert torch.equal(center_crop(images, 4), images[..., 3:7, 3:7])


def test_cutout_default_hole_is_a_quarter_of_the_image() -> None:
    data = DataConfig(img_size=32, crop_pct=1.0, mean=[0, 0, 0], std=[1, 1, 1])
    pipeline = BatchAugment(data, CutoutConfig(length=None, p=1.0), 10, 0.0, torch.device("cpu"), seed=0)
    images = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    x, _ = pipeline(images, torch.zeros(64, dtype=torch.long))
    holes = (x[:, 0] == 0).sum(dim=(1, 2))
    assert holes.max() == 8 * 8 and holes.min() >= 4 * 4  # 8 px holes, clipped at the border


# --- Mixup or CutMix, one per batch ----------------------------------------------------------------------
def build(cfg, img_size: int = 16, seed: int = 0):
    """An augmentation as BatchAugment builds it, with its own seeded generators."""
    return AUGMENTATIONS.build(cfg, img_size, gen(seed), np.random.default_rng(seed))


def test_mixup_cutmix_picks_cutmix_at_switch_prob_with_exact_targets() -> None:
    n, size, batches = 8, 12, 400
    # sample i is the constant i + 1: a CutMix pixel is some sample's value, a Mixup pixel lies between two
    images = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    targets = F.one_hot(torch.arange(n), n).float()
    mix = build(MixupCutMixConfig(mixup_alpha=50.0, switch_prob=0.3), size)  # Mixup's lambda near 0.5: visible
    cutmix_batches = 0
    for _ in range(batches):
        x, y = mix(images, targets)
        assert torch.allclose(y.sum(1), torch.ones(n))
        own = y.diagonal()  # each sample's weight on its own label
        if torch.equal(x, x.round()):  # CutMix: pixels copied, each label weighted by its area
            cutmix_batches += 1
            kept = (x[:, 0] == images[:, 0]).float().mean(dim=(1, 2))
            assert torch.allclose(own, kept)
            for i in torch.nonzero(kept < 1).flatten().tolist():  # the rest of the label is the pasted partner's
                pasted = x[i, 0][x[i, 0] != i + 1]
                assert torch.all(pasted == pasted[0])
                assert y[i, int(pasted[0]) - 1] == pytest.approx(1 - kept[i].item())
        else:  # Mixup: one lambda for the batch, in the pixels as in the targets
            lam = own[own < 1][0]
            assert torch.allclose(own[own < 1], lam.expand(int((own < 1).sum())))
            partner_value = (x[:, 0, 0, 0] - lam * images[:, 0, 0, 0]) / (1 - lam)
            assert torch.allclose(partner_value[own < 1], partner_value[own < 1].round(), atol=1e-3)
    assert abs(cutmix_batches / batches - 0.3) < 0.06  # binomial sd 0.023


def test_mixup_cutmix_p_zero_and_switch_prob_extremes() -> None:
    images, targets = torch.rand(6, 3, 8, 8), F.one_hot(torch.arange(6), 6).float()
    x, y = build(MixupCutMixConfig(p=0.0), 8)(images, targets)
    assert torch.equal(x, images) and torch.equal(y, targets)
    for switch_prob, cutmix_expected in ((0.0, False), (1.0, True)):
        mix = build(MixupCutMixConfig(switch_prob=switch_prob, mixup_alpha=50.0), 8)
        quantised = (images * 255).round()
        x, _ = mix(quantised, targets)
        assert torch.equal(x, x.round()) == cutmix_expected


# --- Random Erasing --------------------------------------------------------------------------------------
def test_random_erasing_erases_one_rectangle_within_scale_and_ratio() -> None:
    n, height, width, scale, ratio = 256, 48, 64, (0.02, 1 / 3), (0.5, 3.0)  # asymmetric: h / w
    images = torch.rand(n, 3, height, width) + 1  # no pixel is zero before erasing
    out = random_erasing(images, 1.0, scale, ratio, "const", gen(5))
    erased = out == 0
    assert torch.equal(erased, erased[:, :1].expand_as(erased))  # every channel of a pixel
    assert torch.equal(out[~erased], images[~erased])
    for mask in erased[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert h >= 1 and w >= 1, "p=1 erases every image (a box of 10 tries fits)"
        assert mask.sum() == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # one rectangle
        # h, w are the rounded sides of an area in scale with h / w in ratio
        assert (h + 0.5) * (w + 0.5) >= scale[0] * height * width
        assert (h - 0.5) * (w - 0.5) <= scale[1] * height * width
        assert (h + 0.5) / (w - 0.5) >= ratio[0] and (h - 0.5) / (w + 0.5) <= ratio[1]
        assert h < height and w < width


def test_random_erasing_boxes_follow_torchvisions_distribution() -> None:
    n, size, scale, ratio = 20000, 32, (0.02, 1 / 3), (0.3, 3.3)
    boxes, found = sample_erasing_boxes(n, size, size, scale, ratio, gen(0))
    assert found.all()
    torch.manual_seed(0)
    image = torch.empty(1, size, size)
    reference = torch.tensor(
        [TorchvisionRandomErasing.get_params(image, scale, ratio, [0])[:4] for _ in range(n)], dtype=torch.float32
    )  # (top, left, h, w) as ours
    for ours, theirs in ((boxes[:, 2] * boxes[:, 3], reference[:, 2] * reference[:, 3]),  # area
                         (torch.log(boxes[:, 2] / boxes[:, 3]), torch.log(reference[:, 2] / reference[:, 3])),
                         (boxes[:, 0], reference[:, 0]), (boxes[:, 1], reference[:, 1])):  # fmt: skip
        assert abs(ours.mean() - theirs.mean()) < 0.02 * theirs.abs().mean() + 0.02
        assert abs(ours.std() - theirs.std()) < 0.03 * theirs.std() + 0.02


def test_random_erasing_p_zero_is_identity_and_pixel_mode_fills_noise() -> None:
    images, targets = torch.rand(32, 3, 16, 16) + 5, F.one_hot(torch.arange(32) % 10, 10).float()
    x, y = build(RandomErasingConfig(p=0.0))(images, targets)
    assert torch.equal(x, images) and torch.equal(y, targets)
    x, y = build(RandomErasingConfig(p=1.0, mode="pixel"))(images, targets)
    assert torch.equal(y, targets)  # labels untouched
    noise = x < 5  # every erased pixel is N(0, 1) noise, far below the image's values
    assert noise.any(dim=(1, 2, 3)).all()
    assert torch.equal(x[~noise], images[~noise])
    assert abs(x[noise].mean().item()) < 0.1 and abs(x[noise].std().item() - 1) < 0.1


def test_random_erasing_is_seeded() -> None:
    images, targets = torch.rand(16, 3, 16, 16), torch.zeros(16, 10)
    cfg = RandomErasingConfig(p=0.5, mode="pixel")
    a, b, c = (build(cfg, seed=seed)(images, targets)[0] for seed in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("aug", [RandomErasingConfig(p=0.5, mode="pixel"), MixupCutMixConfig()], ids=["re", "mix"])
def test_resumed_pipeline_draws_the_same_next_batches(aug) -> None:
    data = DataConfig(img_size=16, crop_pct=0.8)
    images = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    straight = BatchAugment(data, aug, 10, 0.1, torch.device("cpu"), seed=3)
    straight(images, labels)
    state = straight.state_dict()
    expected = [straight(images, labels) for _ in range(3)]
    resumed = BatchAugment(data, aug, 10, 0.1, torch.device("cpu"), seed=99)
    resumed.load_state_dict(state)
    for x, y in expected:
        x2, y2 = resumed(images, labels)
        assert torch.equal(x, x2) and torch.equal(y, y2)


# --- they train ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aug", [["aug=mixup_cutmix"], ["aug=random_erasing", "aug.p=0.5"]], ids=lambda a: a[0])
def test_digits_trains_with_the_augmentation(make_cfg, tmp_path: Path, aug: list[str]) -> None:
    overrides = [*TINY, "data=digits", "trainer.epochs=6", "data.batch_size=64", "sched.warmup_epochs=1"]
    results = run.run(make_cfg(*overrides, "optim.lr=3e-3", "smoothing=0.1", *aug), tmp_path / "run", RunIdentity({}))
    assert math.isfinite(results["test"]["loss"])
    assert results["test"]["acc"] > 0.4  # chance is 0.1
