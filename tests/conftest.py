"""Shared fixtures: Hydra composition of the real conf/, generated datasets in their real on-disk layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from vitexp.engine import Trainer
from vitexp.groups import register_schemas

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
register_schemas()

# A tiny, fast model and schedule for end-to-end tests on CPU.
TINY = [
    "model.dim=32",
    "model.depth=2",
    "model.heads=2",
    "model.patch_size=8",
    "data.img_size=16",
    "data.crop_pct=1.0",
    "data.num_workers=0",
    "logger=none",
]


@pytest.fixture(autouse=True)
def _isolate_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach W&B servers, read the user's W&B login or write outside its temp dir."""
    for key in list(os.environ):
        if key.startswith("WANDB_") or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    for key in ("WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_DISABLE_CODE", "WANDB_X_DISABLE_STATS"):
        monkeypatch.setenv(key, "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / ".wandb-data"))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / ".torch"))


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    """Compose the real conf/ with command-line style overrides, as `python train.py ...` would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture
def stop_once_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """`stop_once_at(step)`: the next run stops after optimizer step `step`, as a preemption signal makes it
    (checkpoint, return {}); the runs after it go on undisturbed."""

    def arm(step: int) -> None:
        original, stopped = Trainer.optimizer_step, {"done": False}

        def step_then_stop(self: Trainer, finite) -> None:
            original(self, finite)
            if self.progress.step == step and not stopped["done"]:
                stopped["done"] = self.stop_requested = True

        monkeypatch.setattr(Trainer, "optimizer_step", step_then_stop)

    return arm


def cluster_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and any(state in result.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local SLURM cluster (tests/slurm/cluster.sh): skipped without one, except in CI where it must run."""
    if not cluster_answers():
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster answers; .ci/run starts one with tests/slurm/cluster.sh")
        pytest.skip(
            "no SLURM cluster (start one: sudo tests/slurm/cluster.sh install && sudo tests/slurm/cluster.sh start)"
        )


def run_train(
    *overrides: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `python train.py OVERRIDES` as a user would, returning the finished process."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- a generated Oxford-IIIT Pet tree ------------------------------------------------------------------
PET_BREEDS = {  # class id (1-based, as in the real annotations) -> image file prefix
    1: "Abyssinian",
    5: "beagle",
    12: "Egyptian_Mau",
    30: "samoyed",
    37: "yorkshire_terrier",
}


def pet_image(class_id: int, index: int, rng: np.random.Generator) -> Image.Image:
    """A ~500x375 photo-sized image whose colour says its class, with noise, so a model can learn it."""
    hue = np.array([(class_id * 37) % 256, (class_id * 91) % 256, (class_id * 53) % 256], dtype=np.float32)
    height, width = 375 - (index % 3) * 20, 500
    noise = rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(hue + noise, 0, 255).astype(np.uint8))


def write_pets_tree(root: Path, breeds: dict[int, str] = PET_BREEDS, per_split: int = 12, seed: int = 0) -> Path:
    """Write `root/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}` like the real dataset."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, offset in (("trainval", 0), ("test", 1000)):
        lines = []
        for class_id, prefix in breeds.items():
            species = 1 if prefix[0].isupper() else 2  # cats are capitalised in the real file names
            for i in range(per_split):
                image_id = f"{prefix}_{offset + i + 1}"
                pet_image(class_id, i, rng).save(base / "images" / f"{image_id}.jpg", quality=90)
                lines.append(f"{image_id} {class_id} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture
def pets_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "data"
    write_pets_tree(root)
    yield root


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist several test processes share the CPUs: each trains (and lets its subprocesses train)
    on one thread, so they do not oversubscribe the cores and slow each other down."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the local SLURM cluster run one after another on one worker (`--dist loadgroup`): its few
    nodes are shared, and a sweep waiting for another test's jobs would only add to the wall time."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
