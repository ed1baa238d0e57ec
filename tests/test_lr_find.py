"""The LR finder: its suggestion on synthetic loss curves, a real range test on digits, and what it refuses."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY
from vitexp.config import ConfigError
from vitexp.lr_find import find_lr, main, parse_args, suggest_lr

DIGITS = [*TINY, "data=digits"]
PNG = b"\x89PNG\r\n\x1a\n"


def drop_then_diverge(lrs: np.ndarray, centre: float = 1e-3) -> np.ndarray:
    """A loss that falls from 2.3 to 0.3 in a logistic drop centred at `centre`, then blows up past 0.1."""
    x = np.log10(lrs)
    return 2.3 - 2.0 / (1 + np.exp(-3 * (x - math.log10(centre)))) + 0.05 * np.exp(4 * (x + 1))


def test_suggestion_is_the_steepest_descent_not_the_lowest_loss() -> None:
    lrs = np.logspace(-7, 1, 100)
    for centre in (1e-3, 1e-5):
        losses = drop_then_diverge(lrs, centre)
        lowest = lrs[np.argmin(losses)]
        assert lowest / centre > 10  # the lowest loss lies far past the drop
        suggested = suggest_lr(lrs, losses)
        assert centre / 1.5 < suggested < centre * 1.5
    noisy = drop_then_diverge(lrs) + np.random.default_rng(0).normal(0, 0.02, lrs.shape)
    assert 1e-3 / 2 < suggest_lr(lrs.tolist(), noisy.tolist()) < 1e-3 * 2


def test_suggestion_ignores_the_first_points_and_a_curve_that_never_falls() -> None:
    lrs = np.logspace(-7, 1, 50)
    losses = drop_then_diverge(lrs)
    losses[:2] = [9.0, 4.0]  # a bias-corrected average of a batch or two falls steeply at the start
    assert 1e-3 / 2 < suggest_lr(lrs, losses) < 1e-3 * 2
    rising = np.linspace(1.0, 3.0, 50)
    assert lrs[0] <= suggest_lr(lrs, rising) <= lrs[-1]
    with pytest.raises(ValueError, match="at least 3"):
        suggest_lr(lrs[:2], rising[:2])


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def check_ramp(found: dict, min_lr: float, max_lr: float, steps: int) -> None:
    lrs, losses = found["lrs"], found["losses"]
    assert len(lrs) == len(losses) == len(found["raw_losses"]) <= steps
    assert lrs[0] == pytest.approx(min_lr)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert ratios == pytest.approx(np.full(len(ratios), (max_lr / min_lr) ** (1 / (steps - 1))), rel=1e-9)
    assert all(math.isfinite(loss) for loss in losses + found["raw_losses"])
    assert min_lr <= found["suggested_lr"] <= max_lr and found["suggested_lr"] in lrs


def test_range_test_on_digits_writes_its_own_directory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default directory is lr_find/<date>/<time> under the working directory
    found = find_lr([*DIGITS, "lr_find.min_lr=1e-5", "lr_find.max_lr=1e-2", "lr_find.steps=30"])
    out = found["dir"]
    assert out.parent.parent == Path("lr_find")
    written = json.loads((out / "lr_find.json").read_text())
    assert written["lrs"] == found["lrs"] and written["suggested_lr"] == found["suggested_lr"]
    check_ramp(written, 1e-5, 1e-2, 30)
    assert len(written["lrs"]) == 30 and not written["diverged"]  # 30 > one epoch of digits: two epochs
    assert written["lrs"][-1] == pytest.approx(1e-2)
    assert written["losses"][-1] < written["losses"][0]  # it trained: the loss fell
    assert (out / "lr_find.png").read_bytes().startswith(PNG)
    assert files_under(tmp_path) == {str(out / "lr_find.json"), str(out / "lr_find.png")}  # no last.pt, best.pt


def test_range_test_stops_when_the_loss_diverges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "finder"
    found = find_lr([*DIGITS, "lr_find.min_lr=1e-3", "lr_find.max_lr=1e6", "lr_find.steps=20", f"lr_find.dir={out}"])
    check_ramp(found, 1e-3, 1e6, 20)
    assert found["diverged"] and len(found["lrs"]) < 20  # the rates past divergence were never tried
    assert json.loads((out / "lr_find.json").read_text())["diverged"]
    assert (out / "lr_find.png").read_bytes().startswith(PNG)
    assert files_under(tmp_path) == {"finder/lr_find.json", "finder/lr_find.png"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["lr_find.min_lr=-1"], "lr_find.min_lr=-1.0 is not allowed: expected a float > 0"),
        (["lr_find.bogus=1"], "unknown key lr_find.bogus"),
        (["lr_find.max_lr=1e-8"], "lr_find.max_lr=1e-08 is not allowed: expected a float > lr_find.min_lr=1e-07"),
        (["lr_find.steps=ten"], "lr_find.steps='ten' is not allowed: expected an integer"),
        (["lr_find.smoothing=1"], "lr_find.smoothing=1.0 is not allowed"),
        (["lr_find.steps"], "unknown key lr_find.steps"),
        (["hydra.run.dir=x"], "hydra.run.dir is not read by the LR finder"),
    ],
)
def test_bad_finder_keys_are_refused_naming_the_key(args: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(named)}"):
        parse_args(args)


def test_bad_keys_exit_2_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for args, named in (
        ([*DIGITS, "lr_find.bogus=1"], "lr_find.bogus"),
        ([*DIGITS, "smoothing=1.5"], "smoothing=1.5 is not allowed"),  # train.py's own check, same words
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert named in capsys.readouterr().err
    assert files_under(tmp_path) == set()
    assert parse_args(["lr_find.steps=20", "lr_find.dir=out", "data=digits"]) == (
        parse_args(["lr_find.steps=20", "lr_find.dir=out"])[0],
        ["data=digits"],
    )


def test_an_existing_directory_with_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(ConfigError, match=r"lr_find\.dir=.*mine.* is not allowed: expected a new or empty directory"):
        find_lr([*DIGITS, "lr_find.steps=5", f"lr_find.dir={out}"])
    assert files_under(out) == {"notes.txt"} and (out / "notes.txt").read_text() == "keep me\n"
