"""The augmentation preview shows the batch the first training step trains on, pixel for pixel, titled with the
classes and λ its soft targets hold; it never overwrites a file and refuses bad keys as train.py does. A run asked
for samples (`logger.wandb.log_samples=true`) draws the same picture as samples.png, once, without changing what
it trains."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import TINY
from vitexp import checkpoint, run, samples
from vitexp.config import ConfigError, validate
from vitexp.engine import Trainer
from vitexp.preview import main, parse_args, preview
from vitexp.run import RunIdentity
from vitexp.samples import HEADER_PX, Layout, Samples, describe, samples_hooks, show_lambda

SMOOTHING = 0.1
MIXUP = [*TINY, "data=digits", "aug=mixup", "aug.alpha=1.0", f"smoothing={SMOOTHING}", "seed=3", "data.batch_size=32"]
SAMPLES = ["logger=wandb", "logger.wandb.mode=disabled", "logger.wandb.log_samples=true"]  # no W&B run, samples.png


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "last.pt")["model"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def build_trainer(make_cfg, overrides: list[str], run_dir: Path) -> Trainer:
    cfg = make_cfg(*overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return Trainer(validate(cfg), run_dir, config, {})


def test_mixup_preview_is_the_first_training_step_pixel_for_pixel(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "look.png"
    shown = preview([*MIXUP, "preview.n=6", f"preview.out={out}"])
    assert shown["out"] == out

    # The same Trainer built independently, its augmentation called once on the first batch of epoch 0.
    trainer = build_trainer(make_cfg, MIXUP, tmp_path / "a")
    images, labels = trainer.to_device(*next(iter(trainer.feed.train(0, 0))))
    inputs, targets = trainer.augment(images, labels)
    expected = (inputs[:6] * 0.5 + 0.5).clamp(0, 1)  # digits: mean = std = 0.5
    torch.testing.assert_close(shown["images"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(shown["targets"], targets[:6], rtol=0, atol=0)
    assert not torch.equal(inputs, trainer.augment.normalize(images))  # mixed, not just normalised

    # ...and what the training loop itself feeds the model at its first step.
    fed: list[torch.Tensor] = []
    loop = build_trainer(make_cfg, MIXUP, tmp_path / "b")
    loop.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone()))
    loop.train_steps(1)
    torch.testing.assert_close(shown["images"], (fed[0][:6] * 0.5 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)

    # The PNG: 4 columns x 2 rows of 16 px images scaled 8x to 128 px, each cell 212 x 170 px, a header line.
    layout = shown["layout"]
    assert (layout.cols, layout.rows, layout.scale) == (4, 2, 8)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == layout.size == (4 * 212, HEADER_PX + 2 * 170)
        png = np.asarray(image.convert("RGB"))
    want = (expected * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(6):
        left, top = layout.image_origin(i)
        cell = png[top : top + 128, left : left + 128]
        assert (cell == want[i].repeat(8, axis=0).repeat(8, axis=1)).all(), f"image {i}"

    # Titles: the two largest entries of each soft target, smoothing taken out; λ the larger share.
    mixed = 0
    for title, lam, target in zip(shown["titles"], shown["lambdas"], targets[:6], strict=True):
        weights = (target.double() - SMOOTHING / 10) / (1 - SMOOTHING)
        top = torch.topk(weights, 2)
        first, second = top.indices.tolist()
        if top.values[1] > 1e-6:
            mixed += 1
            assert title.startswith(f"{first} & {second}, λ=") and "&" in title and "λ=" in title
            assert float(title.split("λ=")[1]) == pytest.approx(top.values[0].item(), abs=0.005)
            assert lam == pytest.approx(top.values[0].item(), abs=1e-6) and 0.5 <= lam < 1
        else:
            assert title == str(first) and lam == 1.0
    assert mixed >= 4  # Beta(1, 1): nearly every image is a mix


def test_titles_say_the_classes_and_the_mixing_weight() -> None:
    names = ["cat", "dog", "cow"]
    mix = torch.tensor([0.3, 0.7, 0.0]) * (1 - 0.1) + 0.1 / 3  # 30% cat, 70% dog, smoothed by 0.1
    assert describe(mix, names, 0.1) == ("dog & cat, λ=0.70", pytest.approx(0.7))
    assert describe(torch.tensor([0.0, 0.0, 1.0]), names, 0.0) == ("cow", 1.0)
    assert describe(torch.tensor([0.0, 0.0, 1.0]) * 0.7 + 0.1, names, 0.3)[0] == "cow"  # smoothing alone: one class
    assert show_lambda(0.63) == "0.63" and show_lambda(0.9984) == "0.998" and show_lambda(0.99996) == "0.99996"
    assert Layout(1, 224).size == (224 + 12, HEADER_PX + 30 + 224 + 12)  # big images are not scaled


def test_an_existing_file_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine.png"
    out.write_bytes(b"keep me")
    with pytest.raises(ConfigError, match=re.escape(f"{out} already exists")):
        preview([*TINY, "data=digits", f"preview.out={out}"])
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, "data=digits", f"preview.out={out}"])
    assert exit_.value.code == 2 and f"{out} already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and files_under(tmp_path) == {"mine.png"}

    first = preview([*TINY, "data=digits", "preview.n=2"])  # the default: preview/<date>/<time>/preview.png
    assert first["out"].parts[0] == "preview" and first["out"].name == "preview.png" and len(first["out"].parts) == 4
    assert files_under(tmp_path) == {"mine.png", str(first["out"])}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["preview.bogus=1"], "unknown key preview.bogus"),
        (["preview.n"], "unknown key preview.n"),
        (["preview.n=0"], "preview.n=0 is not allowed: expected an integer >= 1"),
        (["preview.n=six"], "preview.n='six' is not allowed: expected an integer"),
        (["preview.out=look.jpg"], "preview.out='look.jpg' is not allowed: expected a file name ending in .png"),
        (["hydra.run.dir=x"], "hydra.run.dir is not read by the preview"),
    ],
)
def test_bad_preview_keys_are_refused_naming_the_key(args: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(named)}"):
        parse_args(args)


def test_bad_overrides_exit_as_train_py_does_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for args, named, code in (
        (["preview.bogus=1"], "unknown key preview.bogus", 2),
        (["smoothing=1.5"], "smoothing=1.5 is not allowed", 2),  # train.py's own check, same words
        (["data.batch_size=4", "preview.n=5"], "preview.n=5 is not allowed: expected at most data.batch_size=4", 2),
        (["aug=bogus"], "aug", 1),  # Hydra's composition error, status 1 as train.py
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*TINY, "data=digits", *args])
        assert exit_.value.code == code
        assert named in capsys.readouterr().err
    assert files_under(tmp_path) == set()
    assert parse_args(["preview.n=3", "data=digits"]) == (parse_args(["preview.n=3"])[0], ["data=digits"])


def test_a_run_asked_for_samples_draws_the_preview_once_as_samples_png(make_cfg, tmp_path: Path) -> None:
    results = run.run(make_cfg(*MIXUP, "trainer.epochs=1", *SAMPLES), tmp_path / "run", RunIdentity({}))
    assert results["test"]["acc"] >= 0
    shown = preview([*MIXUP, f"preview.out={tmp_path / 'preview.png'}"])  # 8 images of the batch of 32
    assert (pixels(tmp_path / "run" / "samples.png") == pixels(shown["out"])).all()
    assert "could not draw" not in (tmp_path / "run" / "train.log").read_text()


def test_samples_are_drawn_when_a_chosen_sink_asks(make_cfg) -> None:
    def hooks(*overrides: str) -> list[type]:
        return [type(hook) for hook in samples_hooks(validate(make_cfg(*TINY, *overrides)))]

    assert hooks() == [] and hooks("logger=[wandb,tensorboard]") == []  # the key's default: false
    assert hooks("logger=[tensorboard,wandb]", "logger.wandb.log_samples=true") == [Samples]


def test_a_picture_that_fails_is_a_warning_and_changes_nothing_trained(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = run.run(make_cfg(*MIXUP, "trainer.epochs=1"), tmp_path / "plain", RunIdentity({}))
    assert not (tmp_path / "plain" / "samples.png").exists()

    def broken(*args: object) -> None:
        raise RuntimeError("no titles today")

    monkeypatch.setattr(samples, "describe", broken)  # fails after the batch was drawn and augmented
    failed = run.run(make_cfg(*MIXUP, "trainer.epochs=1", *SAMPLES), tmp_path / "failed", RunIdentity({}))
    assert (
        "could not draw the training samples: RuntimeError: no titles today"
        in (tmp_path / "failed" / "train.log").read_text()
    )
    assert not (tmp_path / "failed" / "samples.png").exists()
    assert failed["test"] == plain["test"]
    assert same_weights(trained_weights(tmp_path / "failed"), trained_weights(tmp_path / "plain"))


def test_a_resumed_run_draws_nothing_and_resumes_whether_or_not_it_asks_for_samples(
    make_cfg, tmp_path: Path, stop_once_at
) -> None:
    asking, not_asking = make_cfg(*MIXUP, "trainer.epochs=1", *SAMPLES), make_cfg(*MIXUP, "trainer.epochs=1")
    for first, then, name in ((asking, not_asking, "dropped"), (not_asking, asking, "added")):
        stop_once_at(3)
        assert run.run(first, tmp_path / name, RunIdentity({})) == {}
        drawn = tmp_path / name / "samples.png"
        assert drawn.exists() == (first is asking)
        drawn.unlink(missing_ok=True)
        assert run.run(then, tmp_path / name, RunIdentity({}))["test"]["acc"] >= 0  # logger keys may change
        assert not drawn.exists()
