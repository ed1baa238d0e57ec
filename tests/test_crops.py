"""The training crop modes: `pad_crop` is CIFAR's RandomCrop(size, padding) + flip to the pixel, `squash`
keeps the whole picture (Pets squashed, never cropped, with a cache of its own), and both evaluate the
stored image as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitexp import pets
from vitexp.augment import BatchAugment, CutoutConfig
from vitexp.config import AugConfig, DataConfig
from vitexp.data import build_splits
from vitexp.pets import PetsImages

IDENTITY_NORM = {"mean": [0.0, 0.0, 0.0], "std": [1 / 255] * 3}  # normalised pixels == uint8 values


def pipeline(data: DataConfig, seed: int = 0) -> BatchAugment:
    return BatchAugment(data, AugConfig(), 10, 0.0, torch.device("cpu"), seed=seed)


def window(image: torch.Tensor, top: int, left: int, size: int, flip: bool) -> torch.Tensor:
    crop = image[:, top : top + size, left : left + size]
    return crop.flip(-1) if flip else crop


def test_pad_crop_is_a_crop_of_the_zero_padded_image_then_a_flip() -> None:
    size, pad, n = 12, 3, 200
    data = DataConfig(img_size=size, crop="pad_crop", crop_padding=pad, hflip=0.5, **IDENTITY_NORM)
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8)  # no zero: padding is recognisable
    x, _ = pipeline(data)(images.contiguous(memory_format=torch.channels_last), torch.zeros(n, dtype=torch.long))
    assert x.shape == (n, 3, size, size)
    padded = torch.nn.functional.pad(images, (pad,) * 4).float()
    seen = set()
    for i in range(n):
        matches = [
            (top, left, flip)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(x[i], window(padded[i], top, left, size, flip))
        ]
        assert len(matches) == 1, f"image {i} is no crop of its padded input"
        seen.add(matches[0])
    tops, lefts, flips = ({m[k] for m in seen} for k in range(3))
    assert tops == lefts == set(range(2 * pad + 1)) and flips == {False, True}  # every offset, both ways


def test_pad_crop_is_seeded_and_evaluates_the_image_as_it_is() -> None:
    data = DataConfig(img_size=16, crop="pad_crop", **IDENTITY_NORM)
    images, labels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    a, b, c = (pipeline(data, seed)(images, labels)[0] for seed in (4, 4, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(pipeline(data).eval_batch(images), images.float())


def test_pad_crop_with_no_padding_and_no_flip_is_the_identity() -> None:
    data = DataConfig(img_size=16, crop="pad_crop", crop_padding=0, hflip=0.0, **IDENTITY_NORM)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(pipeline(data)(images, torch.zeros(8, dtype=torch.long))[0], images.float())


def test_squash_trains_and_evaluates_on_the_whole_stored_image() -> None:
    data = DataConfig(img_size=16, crop="squash", hflip=1.0, crop_scale=[0.1, 0.1], **IDENTITY_NORM)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    augment = BatchAugment(data, CutoutConfig(p=0.0), 10, 0.0, torch.device("cpu"), seed=0)
    x, _ = augment(images, torch.zeros(8, dtype=torch.long))
    assert torch.equal(x, images.float())  # no crop, no flip whatever crop_scale and hflip say
    assert torch.equal(augment.eval_batch(images), images.float())


@pytest.mark.parametrize("crop", ["pad_crop", "squash"])
def test_a_batch_not_stored_at_img_size_is_refused(crop: str) -> None:
    data = DataConfig(img_size=16, crop=crop)
    with pytest.raises(ValueError, match=f"data.crop={crop} takes images stored at data.img_size=16 px, got 20x20"):
        pipeline(data)(torch.zeros(2, 3, 20, 20, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("crop", ["pad_crop", "squash"])
def test_stored_images_are_img_size_whatever_crop_pct(crop: str) -> None:
    splits = build_splits(DataConfig(name="digits", img_size=24, crop_pct=0.75, crop=crop))
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 24, 24)


def write_wide_image(path: Path) -> None:
    """A 2:1 image: a red left quarter, a blue right quarter, green between (a center crop sees only green)."""
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:150] = (0, 255, 0)
    pixels[:, 150:] = (0, 0, 255)
    Image.fromarray(pixels).save(path, quality=95)


def pets_cfg(root: Path, **overrides) -> DataConfig:
    settings = {"img_size": 32, "crop_pct": 1.0, "num_workers": 0, "val_fraction": 0.25} | overrides
    return DataConfig(name="pets", root=str(root), download=False, **settings)


def test_squash_keeps_the_whole_wide_pets_image(pets_root: Path) -> None:
    write_wide_image(pets_root / "oxford-iiit-pet" / "images" / "Abyssinian_1001.jpg")  # the first test image
    squashed = build_splits(pets_cfg(pets_root, crop="squash")).test.tensors[0][0].float()
    cropped = build_splits(pets_cfg(pets_root)).test.tensors[0][0].float()
    assert squashed.shape == cropped.shape == (3, 32, 32)
    red, green, blue = (squashed[:, :, cols].mean(dim=(1, 2)) for cols in (slice(0, 6), slice(13, 19), slice(26, 32)))
    assert red[0] > 200 > red[2] and green[1] > 200 and blue[2] > 200 > blue[0]  # both ends kept, in place
    assert torch.all((squashed[:, 0] - squashed[:, 31]).abs() < 8)  # the rows are the same: only widths shrank
    assert cropped[1].mean() > 200 and cropped[0].max() < 60 and cropped[2].max() < 60  # the crop loses the ends
    # exactly the whole image resized to 32 x 32, as PetsImages (the cache=false path) decodes it too
    direct = PetsImages(pets_root, "test", 32, squash=True)[0][0]
    assert torch.equal(squashed.to(torch.uint8), direct)


def test_squash_and_crop_caches_have_different_keys_and_files(pets_root: Path, monkeypatch) -> None:
    base = pets_root / "oxford-iiit-pet"
    squashed = build_splits(pets_cfg(pets_root, crop="squash"))
    cropped = build_splits(pets_cfg(pets_root))  # the same stored size (32 px): only the resize differs
    files = sorted(p.name for p in (base / ".vitexp-cache").glob("*.pt"))
    assert len(files) == 4 and sum("-squash-" in name for name in files) == 2  # neither pruned the other's
    keys = [torch.load(base / ".vitexp-cache" / name, weights_only=True)["key"] for name in files]
    assert len({str(sorted(key.items())) for key in keys}) == 4
    assert not torch.equal(squashed.test.tensors[0], cropped.test.tensors[0])

    def no_decoding(*args, **kwargs):
        raise AssertionError("each mode's cache is still there and valid")

    monkeypatch.setattr(pets, "decode_all", no_decoding)
    assert torch.equal(build_splits(pets_cfg(pets_root, crop="squash")).test.tensors[0], squashed.test.tensors[0])
    assert torch.equal(build_splits(pets_cfg(pets_root)).test.tensors[0], cropped.test.tensors[0])
