"""Datasets in their real on-disk layout: Pets through torchvision's class, downloads, odd files, splits."""

from __future__ import annotations

import hashlib
import http.server
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import OxfordIIITPet

from tests.conftest import PET_BREEDS, REPO, write_pets_tree
from vitexp.config import POLICIES, DataConfig
from vitexp.data import build_splits
from vitexp.feed import POLICY_TRANSFORMS, EpochOrder, PolicyImages, SampleSeeds
from vitexp.pets import PETS_COMPLETE_MARKER, PetsImages, prepare_pets
from vitexp.splits import DataError, stratified_split


def pets_cfg(root: Path, **overrides) -> DataConfig:
    return DataConfig(name="pets", root=str(root), download=False, img_size=32, crop_pct=0.8, **overrides)


def test_pets_splits_keep_37_classes_for_a_partial_copy(pets_root: Path) -> None:
    splits = build_splits(pets_cfg(pets_root, val_fraction=0.25))
    assert splits.num_classes == 37 and len(splits.class_names) == 37
    assert splits.class_names[29] == "Samoyed"
    assert len(splits.train) + len(splits.val) == 12 * len(PET_BREEDS) and len(splits.test) == 12 * len(PET_BREEDS)
    image, _ = splits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40)
    labels = {int(splits.val[i][1]) for i in range(len(splits.val))}
    assert labels == {class_id - 1 for class_id in PET_BREEDS}  # annotation ids, never renumbered
    assert len(splits.val) == 3 * len(PET_BREEDS)  # stratified: a quarter of each breed


def test_split_depends_on_split_seed_only(pets_root: Path) -> None:
    a = build_splits(pets_cfg(pets_root, split_seed=0))
    b = build_splits(pets_cfg(pets_root, split_seed=0))
    c = build_splits(pets_cfg(pets_root, split_seed=1))
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])


def test_stratified_split_handles_singleton_classes() -> None:
    labels = [0] * 10 + [1] * 20 + [2]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(31))
    assert [labels[i] for i in val].count(0) == 2 and [labels[i] for i in val].count(1) == 4
    assert 30 in train  # the single sample of class 2 stays in train


def test_odd_images_become_rgb_and_a_truncated_one_is_named(pets_root: Path) -> None:
    images = pets_root / "oxford-iiit-pet" / "images"
    Image.new("L", (300, 200), 128).save(images / "Abyssinian_1.jpg")  # grayscale
    Image.new("CMYK", (300, 200), (10, 200, 30, 0)).save(images / "Abyssinian_2.jpg")  # CMYK JPEG
    Image.new("RGBA", (300, 200), (200, 10, 10, 255)).save(images / "Abyssinian_3.jpg", format="PNG")  # PNG named .jpg
    full = (images / "Abyssinian_4.jpg").read_bytes()
    (images / "Abyssinian_4.jpg").write_bytes(full[: len(full) // 3])  # truncated download
    dataset = PetsImages(pets_root, "trainval", size=32)
    for index in range(3):
        image, label = dataset[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 0
    assert dataset[2][0][0].float().mean() > 150 > dataset[2][0][1].float().mean()  # red survived as red
    with pytest.raises(DataError, match="Abyssinian_4.jpg"):
        dataset[3]


def test_missing_dataset_without_download_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"Oxford-IIIT Pet is not at .*oxford-iiit-pet \(set data.download=true"):
        prepare_pets(tmp_path / "nothing", download=False)


@pytest.mark.parametrize("name", ["pets", "cifar10", "fmnist"])
def test_a_nonexistent_root_is_named_and_not_created(name: str, tmp_path: Path) -> None:
    root = tmp_path / "nonexistent"
    with pytest.raises(DataError, match=f"^data.root {re.escape(str(root))} does not exist .*data.download=true"):
        build_splits(DataConfig(name=name, root=str(root), download=False, num_workers=0))
    assert list(tmp_path.iterdir()) == []


def test_half_extracted_tree_is_detected(pets_root: Path) -> None:
    (pets_root / "oxford-iiit-pet" / "images" / "beagle_7.jpg").unlink()
    with pytest.raises(DataError, match="1 files missing, e.g. .*beagle_7.jpg"):
        prepare_pets(pets_root, download=False)
    assert not (pets_root / "oxford-iiit-pet" / PETS_COMPLETE_MARKER).exists()


# --- download from a local HTTP server, by several processes at once -----------------------------------
@pytest.fixture
def pets_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """Serve images.tar.gz and annotations.tar.gz of a generated tree, as the real Pets site does."""
    source = write_pets_tree(tmp_path / "source", per_split=3)
    served = tmp_path / "served"
    served.mkdir()
    for name in ("images", "annotations"):
        with tarfile.open(served / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(source / name, arcname=name)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            requests.append(f"{self.command} {self.path}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    resources = tuple(
        (f"{url}/{name}.tar.gz", hashlib.md5((served / f"{name}.tar.gz").read_bytes()).hexdigest())
        for name in ("images", "annotations")
    )
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", resources)
    yield {"requests": requests, "source": source, "served": served, "url": url}
    server.shutdown()


def _prepare(root: str) -> None:
    prepare_pets(Path(root), download=True)


def test_concurrent_jobs_download_once(pets_server: dict, tmp_path: Path) -> None:
    prepare_pets(tmp_path / "alone", download=True)
    one_download = sorted(pets_server["requests"])  # torchvision probes each URL for redirects first
    pets_server["requests"].clear()
    root = tmp_path / "shared-root"
    context = multiprocessing.get_context("fork")  # children inherit the patched URLs
    workers = [context.Process(target=_prepare, args=(str(root),)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert sorted(pets_server["requests"]) == one_download
    assert "GET /images.tar.gz" in one_download and "GET /annotations.tar.gz" in one_download
    base = root / "oxford-iiit-pet"
    assert (base / PETS_COMPLETE_MARKER).exists()
    assert sorted(p.name for p in (base / "images").iterdir()) == sorted(
        p.name for p in (pets_server["source"] / "images").iterdir()
    )


def test_half_extracted_tree_is_downloaded_again(pets_server: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    prepare_pets(root, download=True)
    first_download = len(pets_server["requests"])
    base = root / "oxford-iiit-pet"
    (base / PETS_COMPLETE_MARKER).unlink()  # as if the job was killed while extracting
    victim = next((base / "images").iterdir())
    victim.unlink()
    prepare_pets(root, download=True)
    assert victim.exists() and (base / PETS_COMPLETE_MARKER).exists()
    assert len(pets_server["requests"]) == 2 * first_download


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _broken_images(failure: str, server: dict, closed_port: int) -> tuple[str, str, str]:
    """An images.tar.gz resource (url, md5) that fails in the way named, and what the error must say of it."""
    served, url = server["served"], server["url"]
    if failure == "404":
        return f"{url}/gone/images.tar.gz", "0" * 32, "HTTP Error 404"
    if failure == "refused":
        return f"http://127.0.0.1:{closed_port}/images.tar.gz", "0" * 32, "Connection refused"
    if failure == "truncated archive":
        archive = (served / "images.tar.gz").read_bytes()
        (served / "broken.tar.gz").write_bytes(archive[: len(archive) // 2])
    else:  # an archive without one of the images the annotations list
        with tarfile.open(served / "broken.tar.gz", "w:gz") as tar:
            tar.add(server["source"] / "images", "images", filter=lambda m: None if "beagle_2." in m.name else m)
    md5 = hashlib.md5((served / "broken.tar.gz").read_bytes()).hexdigest()
    reason = "Compressed file ended" if failure == "truncated archive" else "lack 1 files, e.g. beagle_2.jpg"
    return f"{url}/broken.tar.gz", md5, reason


def _files(base: Path) -> dict[str, bytes]:
    return {str(path.relative_to(base)): path.read_bytes() for path in sorted(base.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("failure", ["404", "refused", "truncated archive", "archive lacking an image"])
def test_a_failed_download_leaves_the_existing_tree_untouched(
    failure: str, pets_server: dict, closed_port: int, pets_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = pets_root / "oxford-iiit-pet"
    (base / "images" / "beagle_7.jpg").unlink()
    before = _files(base)
    url, md5, reason = _broken_images(failure, pets_server, closed_port)
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", ((url, md5), OxfordIIITPet._RESOURCES[1]))
    with pytest.raises(DataError, match=f"1 files missing, e.g. \\S*beagle_7.jpg; downloading it failed: .*{reason}"):
        prepare_pets(pets_root, download=True)
    assert _files(base) == before
    assert {path.name for path in pets_root.iterdir()} - {".oxford-iiit-pet.lock"} == {"oxford-iiit-pet"}  # no temp dir


def test_a_replaced_image_rebuilds_the_cache(pets_root: Path) -> None:
    cfg = pets_cfg(pets_root, num_workers=0)
    before = build_splits(cfg).test.tensors[0][0]  # Abyssinian_1001, the first line of test.txt
    Image.new("RGB", (320, 240), (255, 255, 255)).save(pets_root / "oxford-iiit-pet" / "images" / "Abyssinian_1001.jpg")
    after = build_splits(cfg).test.tensors[0][0]
    fresh = PetsImages(pets_root, "test", cfg.stored_size)[0][0]
    assert torch.equal(after, fresh) and not torch.equal(after, before)
    assert fresh.min() == 255  # the white picture, not the old pixels
    caches = sorted(p.name for p in (pets_root / "oxford-iiit-pet" / ".vitexp-cache").glob("*.pt"))
    assert [name.split("-")[0] for name in caches] == ["test", "trainval"]  # the outdated test cache is gone


def test_a_tree_set_aside_by_an_interrupted_download_is_put_back(pets_root: Path) -> None:
    """A kill between the two renames of the swap leaves the user's tree under a temporary name."""
    base = pets_root / "oxford-iiit-pet"
    before = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    base.rename(pets_root / ".oxford-iiit-pet.previous-999")
    (pets_root / ".oxford-iiit-pet.download-999" / "oxford-iiit-pet").mkdir(parents=True)  # the partial download
    assert prepare_pets(pets_root, download=False) == base
    after = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != PETS_COMPLETE_MARKER} == before
    assert {p.name for p in pets_root.iterdir()} == {"oxford-iiit-pet", ".oxford-iiit-pet.lock"}


@pytest.mark.parametrize(
    ("split", "number", "line", "marked"),
    [
        ("trainval", 7, "", False),  # blank: found while checking an unmarked tree
        ("test", 3, "beagle_1003 38 2 1", True),  # class out of range: found when the listing is read
        ("test", 5, "beagle_1005 5 dog 1", True),
    ],
)
def test_a_malformed_annotation_line_is_named(
    split: str, number: int, line: str, marked: bool, pets_root: Path
) -> None:
    if marked:
        prepare_pets(pets_root, download=False)
    listing = pets_root / "oxford-iiit-pet" / "annotations" / f"{split}.txt"
    lines = listing.read_text().splitlines()
    lines[number - 1] = line
    listing.write_text("\n".join(lines) + "\n")
    expected = f"{listing} line {number}: expected '<image> <class 1-37> <species> <breed id>', got {line!r}"
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        build_splits(pets_cfg(pets_root, num_workers=0))


# --- a read-only dataset: a process that file permissions apply to -----------------------------------
@pytest.fixture
def unprivileged() -> list[str]:
    """A command prefix under which chmod holds: as root, a process without CAP_DAC_OVERRIDE (setpriv)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-fowner", "--"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root, where chmod does not stop writes, and setpriv cannot drop CAP_DAC_OVERRIDE")
    return prefix


def _load_pets(prefix: list[str], root: Path, **overrides) -> subprocess.CompletedProcess[str]:
    """build_splits in a process run under `prefix`; it prints the sizes of train+val and test."""
    code = (
        "import json, sys; from vitexp.config import DataConfig; from vitexp.data import build_splits; "
        "s = build_splits(DataConfig(**json.loads(sys.argv[1]))); print(len(s.train) + len(s.val), len(s.test))"
    )
    cfg = {"name": "pets", "root": str(root), "img_size": 32, "crop_pct": 0.8, "num_workers": 0, **overrides}
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, json.dumps(cfg)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _read_only(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """chmod the tree read-only; return every path under `root` (itself included) with mtime and bytes."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return _state(root)


def _state(root: Path) -> dict[str, tuple[int, bytes | None]]:
    paths = [root, *sorted(root.rglob("*"))]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in paths}


def test_a_read_only_dataset_works_with_cache_dir_and_is_never_written(
    pets_root: Path, tmp_path: Path, unprivileged: list[str]
) -> None:
    before = _read_only(pets_root)  # a complete tree without the marker, as a shared copy would be
    cache_dir = tmp_path / "cache"
    run = _load_pets(unprivileged, pets_root, cache_dir=str(cache_dir), download=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(12 * len(PET_BREEDS))] * 2
    assert _state(pets_root) == before
    assert sorted(path.name.split("-")[0] for path in cache_dir.glob("*.pt")) == ["test", "trainval"]


def test_a_read_only_root_without_cache_dir_asks_for_one(pets_root: Path, unprivileged: list[str]) -> None:
    before = _read_only(pets_root)
    run = _load_pets(unprivileged, pets_root)
    assert run.returncode == 1
    expected = f"DataError: cannot write to {pets_root} (Permission denied): set data.cache_dir to a writable directory"
    assert expected in run.stderr.splitlines()[-1]
    assert _state(pets_root) == before


def test_digits_splits_are_disjoint_and_test_is_fixed() -> None:
    a = build_splits(DataConfig(name="digits", img_size=16, crop_pct=1.0, split_seed=0))
    b = build_splits(DataConfig(name="digits", img_size=16, crop_pct=1.0, split_seed=7))
    assert a.num_classes == 10
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # test set independent of split_seed
    assert not torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert a.train.tensors[0].shape[1:] == (3, 16, 16) and a.train.tensors[0].dtype == torch.uint8


def test_epoch_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch() -> None:
    order = EpochOrder(size=103, batch_size=10, batches_per_epoch=10, seed=5)
    order.set_position(epoch=2)
    full = list(order)
    assert len(full) == 100 and len(set(full)) == 100
    order.set_position(epoch=2, start_batch=4)
    assert list(order) == full[40:]
    order.set_position(epoch=3)
    assert list(order) != full
    other_seed = EpochOrder(size=103, batch_size=10, batches_per_epoch=10, seed=6)
    other_seed.set_position(epoch=2)
    assert list(other_seed) != full


def test_policy_images_draw_from_their_own_seed_and_leave_the_global_rng_alone() -> None:
    order = EpochOrder(size=40, batch_size=10, batches_per_epoch=4, seed=5)
    order.set_position(epoch=1)
    items = list(SampleSeeds(order))
    assert [index for index, _ in items] == list(order) and len({seed for _, seed in items}) == 40
    order.set_position(epoch=1, start_batch=2)
    assert list(SampleSeeds(order)) == items[20:]  # a resumed epoch gives the same images the same seeds
    order.set_position(epoch=2)
    assert {seed for _, seed in SampleSeeds(order)}.isdisjoint(seed for _, seed in items)

    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    policy = PolicyImages(torch.utils.data.TensorDataset(images, torch.zeros(40)), "randaugment", "digits")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = [policy[item][0] for item in items]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, policy[item][0]) for a, item in zip(first, items, strict=True))
    index, seed = items[0]
    assert any(not torch.equal(first[0], policy[(index, seed + k)][0]) for k in range(1, 5))  # it does draw


def test_every_policy_the_config_allows_has_a_transform() -> None:
    assert set(POLICY_TRANSFORMS) == set(POLICIES) - {"none"}


def test_stratified_split_with_fraction_zero_holds_nothing_out() -> None:
    labels = [0] * 10 + [1] * 3 + [2]
    assert stratified_split(labels, 0.0, seed=3) == (list(range(14)), [])


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_val_fraction_zero_validates_on_the_test_split(name: str) -> None:
    held_out = build_splits(DataConfig(name=name, img_size=8, crop_pct=1.0, val_fraction=0.1))
    splits = build_splits(DataConfig(name=name, img_size=8, crop_pct=1.0, val_fraction=0.0))
    assert splits.selected_on_test and not held_out.selected_on_test
    assert splits.val is splits.test  # the very same images, labels and order
    assert len(splits.train) == len(held_out.train) + len(held_out.val)
    if name == "digits":  # the test split does not move
        assert torch.equal(splits.test.tensors[0], held_out.test.tensors[0])
        assert len(splits.train) + len(splits.test) == 1797


@pytest.mark.parametrize("cache", [True, False])
def test_pets_val_fraction_zero_validates_on_the_test_split(pets_root: Path, cache: bool) -> None:
    splits = build_splits(pets_cfg(pets_root, val_fraction=0.0, cache=cache, num_workers=0))
    assert splits.selected_on_test and splits.val is splits.test
    assert len(splits.train) == len(splits.test) == 12 * len(PET_BREEDS)  # all of trainval trains
