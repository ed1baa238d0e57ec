"""The decode-once cache, CIFAR-10/Fashion-MNIST in their real file formats, and device-resident batches."""

from __future__ import annotations

import hashlib
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from tests.conftest import TINY
from vitexp import checkpoint, feed, pets, run
from vitexp.config import DataConfig, validate
from vitexp.data import build_splits
from vitexp.models import count_parameters
from vitexp.run import RunIdentity


def pets_cfg(root: Path, **overrides) -> DataConfig:
    settings = {"img_size": 32, "crop_pct": 0.8, "num_workers": 0} | overrides
    return DataConfig(name="pets", root=str(root), download=False, **settings)


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "oxford-iiit-pet" / ".vitexp-cache").glob("*.pt"))


def test_cache_is_built_once_and_equals_decoding(pets_root: Path, monkeypatch) -> None:
    cached = build_splits(pets_cfg(pets_root))
    assert len(cache_files(pets_root)) == 2  # trainval and test
    decoded = build_splits(pets_cfg(pets_root, cache=False))
    for split in ("train", "val", "test"):
        images, labels = getattr(cached, split).tensors
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 40, 40)
        direct = getattr(decoded, split)
        for i in (0, len(direct) - 1):
            assert torch.equal(images[i], direct[i][0]) and labels[i] == direct[i][1]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a valid cache must not be decoded again")

    monkeypatch.setattr(pets, "decode_all", no_decoding)
    again = build_splits(pets_cfg(pets_root))
    assert torch.equal(again.train.tensors[0], cached.train.tensors[0])


def test_a_new_size_makes_a_new_cache_and_a_corrupt_one_is_rebuilt(pets_root: Path) -> None:
    build_splits(pets_cfg(pets_root))
    build_splits(pets_cfg(pets_root, img_size=48))
    names = cache_files(pets_root)
    assert len(names) == 4 and {n.split("-")[1] for n in names} == {"40px", "60px"}
    victim = pets_root / "oxford-iiit-pet" / ".vitexp-cache" / names[0]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    splits = build_splits(pets_cfg(pets_root, img_size=48 if "60px" in names[0] else 32))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 120
    torch.load(victim, weights_only=True)  # rebuilt and readable again


def _load(root: str, log_path: str) -> None:
    original = pets.decode_all

    def logged(*args, **kwargs):
        with open(log_path, "a") as log:
            log.write("decode\n")
        return original(*args, **kwargs)

    pets.decode_all = logged
    build_splits(pets_cfg(Path(root)))


def test_concurrent_jobs_decode_once(pets_root: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "decodes.log"
    context = multiprocessing.get_context("spawn")  # a forked child of a process that ran torch can deadlock
    workers = [context.Process(target=_load, args=(str(pets_root), str(log_path))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log_path.read_text().count("decode") == 2  # trainval and test, each by one job only


# --- CIFAR-10 and Fashion-MNIST on generated files in their real formats -----------------------------
def write_cifar10(root: Path, per_batch: int = 20) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        images = np.stack([np.full(3072, 20 * label, dtype=np.uint8) for label in labels])
        images = np.clip(images + rng.integers(0, 10, images.shape), 0, 255).astype(np.uint8)
        with open(base / name, "wb") as file:
            pickle.dump({"data": images, "labels": labels, "batch_label": name}, file)  # as latin1 reads them
    with open(base / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, file)


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "data"
    write_cifar10(root)
    base = root / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    # torchvision checks every file against the real archive's md5: point it at ours
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setitem(CIFAR10.meta, "md5", md5("batches.meta"))
    return root


def test_cifar10_loads_through_torchvision(cifar_root: Path) -> None:
    splits = build_splits(
        DataConfig(name="cifar10", root=str(cifar_root), download=False, img_size=32, crop_pct=1.0, val_fraction=0.1)
    )
    assert splits.num_classes == 10 and splits.class_names[3] == "class3"
    assert len(splits.train) == 90 and len(splits.val) == 10 and len(splits.test) == 20
    images, labels = splits.test.tensors
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.all((images.float().mean(dim=(1, 2, 3)) / 20 - labels.float()).abs() < 0.5)


def test_cifar10_with_val_fraction_zero_validates_on_test(cifar_root: Path) -> None:
    cfg = DataConfig(name="cifar10", root=str(cifar_root), download=False, img_size=32, crop_pct=1.0, val_fraction=0)
    splits = build_splits(cfg)
    assert splits.selected_on_test and splits.val is splits.test
    assert len(splits.train) == 100 and len(splits.test) == 20  # nothing held out of the training split
    resident = feed.Feed(splits, cfg, torch.device("cpu"), batches_per_epoch=1, seed=0)
    assert resident.resident and resident.device_data["val"] is resident.device_data["test"]  # one copy
    assert [torch.equal(a[0], b[0]) for a, b in zip(resident.eval("val"), resident.eval("test"), strict=True)] == [True]
    once, twice = ((100 + n_test) * (3 * 32 * 32 + 8) for n_test in (20, 40))  # uint8 images, int64 labels
    free = (once + twice) / 2 / feed.DEVICE_MEMORY_SHARE  # room for the data once, not with test counted twice
    assert feed.keep_on_device(cfg, splits, free_bytes=int(free))


def test_fmnist_loads_through_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (labels[:, None, None] * 25 + np.zeros((n, 28, 28), dtype=np.uint8)).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], dtype=">i4").tobytes() + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], dtype=">i4").tobytes() + labels.tobytes())
    splits = build_splits(
        DataConfig(
            name="fmnist", root=str(tmp_path / "data"), download=False, img_size=28, crop_pct=1.0, val_fraction=0.2
        )
    )
    images, labels = splits.test.tensors
    assert images.shape == (10, 3, 28, 28) and torch.equal(images[:, 0, 0, 0], labels.to(torch.uint8) * 25)
    assert len(splits.train) == 20 and splits.class_names[0] == "T-shirt/top"  # 1 of 3 per class to val


def test_vit_cifar10_preset_has_the_seed_recipe(make_cfg) -> None:
    from vitexp.models import build_model

    cfg = validate(make_cfg("+experiment=vit_cifar10"))
    assert (cfg.data.name, cfg.data.policy, cfg.smoothing, cfg.trainer.epochs) == ("cifar10", "autoaugment", 0.1, 200)
    assert count_parameters(build_model(cfg.model, 10, cfg.data.img_size)) == 6_268_810  # as published


def test_cifar10_preset_trains_through_the_policy_dataloader(make_cfg, cifar_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        "+experiment=vit_cifar10",
        *[o for o in TINY if not o.startswith("data.")],
        "model.patch_size=8",
        f"data.root={cifar_root}",
        "data.download=false",
        "data.num_workers=0",
        "data.batch_size=30",
        "trainer.epochs=1",
        "logger=none",
    )
    results = run.run(cfg, tmp_path / "run", RunIdentity({"model": "vit", "data": "cifar10"}))
    n_test = len(build_splits(validate(cfg).data).test)
    assert results["test"]["acc"] * n_test == pytest.approx(round(results["test"]["acc"] * n_test))  # k of n right
    assert results["classes"][:2] == ["class0", "class1"] and len(results["classes"]) == 10
    assert checkpoint.load(tmp_path / "run" / "last.pt")["progress"]["step"] == 3


def test_device_batches_and_dataloader_batches_train_identically(make_cfg, tmp_path: Path) -> None:
    overrides = [*TINY, "data=digits", "trainer.epochs=1", "data.batch_size=128", "aug=cutmix", "model.dropout=0.1"]
    for mode in ("true", "false"):
        run.run(make_cfg(*overrides, f"data.on_device={mode}"), tmp_path / mode, RunIdentity({}))
    resident, loader = (checkpoint.load(tmp_path / m / "last.pt")["model"] for m in ("true", "false"))
    for key, value in resident.items():
        assert torch.equal(value, loader[key]), key


def test_device_data_serves_the_permutation_in_order() -> None:
    images = torch.randint(0, 256, (10, 3, 6, 5), dtype=torch.uint8)
    labels = torch.arange(10)
    resident = feed.DeviceData(torch.utils.data.TensorDataset(images, labels), torch.device("cpu"))
    order = torch.randperm(10)
    served = list(resident.batches(4, order))
    assert [len(y) for _, y in served] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in served]), images[order])
    assert torch.equal(torch.cat([y for _, y in served]), order)
    assert torch.equal(torch.cat([x for x, _ in resident.batches(4)]), images)  # evaluation: storage order
