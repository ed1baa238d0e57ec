"""`python -m vitexp.evaluate`: a run's checkpoint evaluated again gives its own test numbers; bad input is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY
from vitexp import run
from vitexp.checkpoint import CheckpointError
from vitexp.config import ConfigError
from vitexp.evaluate import evaluate
from vitexp.logger import RunIdentity


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydra import compose, initialize_config_dir

    overrides = [*TINY, "data=digits", "data.batch_size=128", "trainer.epochs=2"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run.run(cfg, run_dir, RunIdentity({}))
    return run_dir


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)


def test_best_checkpoint_on_test_gives_the_runs_test_and_on_val_its_best_val(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    test = evaluate([str(finished_run)])
    assert test["metrics"]["acc"] == results["test"]["acc"] and close(test["metrics"], results["test"])
    assert json.loads((finished_run / "evaluate_best_test.json").read_text()) == test
    val = evaluate([str(finished_run), "evaluate.split=val", "data.eval_batch_size=37"])  # batching changes nothing
    assert close(val["metrics"], results["best_val"]) and val["epoch"] == results["best_epoch"]
    assert val["overrides"] == ["data.eval_batch_size=37"]


def test_an_existing_output_is_never_replaced_unless_asked(finished_run: Path) -> None:
    out = finished_run / "mine.json"
    out.write_text("a user's file")
    with pytest.raises(ConfigError, match="mine.json exists: set evaluate.overwrite=true"):
        evaluate([str(finished_run), f"evaluate.out={out}"])
    assert out.read_text() == "a user's file"
    last = evaluate([str(finished_run), f"evaluate.out={out}", "evaluate.overwrite=true", "evaluate.checkpoint=last"])
    assert json.loads(out.read_text()) == last and last["checkpoint"] == "last.pt" and last["epoch"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.dim=64"], "model.dim is not read by evaluate: the model and training come from the checkpoint"),
        (["evaluate.split=dev"], "evaluate.split='dev' is not allowed: expected one of train, val, test"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0 is not allowed"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(finished_run: Path, args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate([str(finished_run), *args])


def test_data_that_changes_the_models_shape_is_refused_in_one_line(finished_run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="best.pt's weights do not fit the model these overrides build: size"):
        evaluate([str(finished_run), "data.img_size=32", f"evaluate.out={tmp_path / 'out.json'}"])
    assert not (tmp_path / "out.json").exists()


def test_a_directory_without_a_checkpoint_exits_2_with_one_error_line(tmp_path: Path) -> None:
    """Through the console script `pip install -e .` (requirements.txt) puts on the PATH."""
    (tmp_path / "last.pt").write_bytes(b"")  # a run whose best.pt was deleted
    script = shutil.which("vitexp-evaluate")
    assert script is not None, "vitexp-evaluate is not installed: pip install -r requirements.txt"
    done = subprocess.run([script, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    expected = f"error: {tmp_path} holds no best.pt: evaluate.checkpoint=last evaluates last.pt instead"
    assert done.stderr.strip() == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]  # nothing written
