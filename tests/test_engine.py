"""End-to-end runs: real learning on digits, Pets from disk, exact resume, non-finite losses, outputs."""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import TensorDataset

from tests.conftest import TINY, run_train
from vitexp import checkpoint, run
from vitexp.config import validate
from vitexp.engine import DATA_WAIT_WARNING, Hook, NonFiniteError, Trainer
from vitexp.logger import read_jsonl
from vitexp.models import VisionTransformer
from vitexp.run import RunIdentity
from vitexp.rundir import RunConflictError

IDENTITY = RunIdentity({"model": "vit", "aug": "cutmix", "data": "digits"})
BASE = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128"]
# Every source of randomness on: cutmix, dropout; and smoothing.
RANDOM = ["aug=cutmix", "aug.p=1.0", "smoothing=0.1", "model.dropout=0.1"]


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "data_wait")} for row in rows]


def test_digits_reaches_90_percent_from_the_command_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train("data=digits", "logger=none", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["acc"] >= 0.90
    assert set(results["test"]) >= {"acc", "acc5", "precision", "recall", "f1", "ece", "loss", "confidence"}
    assert results["params"] == 3_364_106 and results["choices"]["data"] == "digits"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == list(range(1, 16))
    assert rows[-1]["val/acc"] > rows[0]["val/acc"]
    assert results["best_val"]["acc"] == max(row["val/acc"] for row in rows)
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert "test (best epoch" in (run_dir / "train.log").read_text()


def test_pets_tree_with_some_breeds_trains_and_tests_on_37_classes(pets_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        *TINY,
        "data=pets",
        f"data.root={pets_root}",
        "data.download=false",
        "trainer.epochs=8",
        "data.batch_size=16",
        "sched.warmup_epochs=1",
        "optim.lr=3e-3",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    best = torch.load(run_dir / "best.pt", weights_only=False)
    assert best["model"]["head.weight"].shape == (37, 32)  # 37 outputs although only 5 breeds are present
    assert results["test"]["acc"] > 0.6  # colour-coded breeds: clearly learned (chance is 0.2)


def fit(make_cfg, run_dir: Path, *overrides: str) -> dict:
    return run.run(make_cfg(*BASE, *(overrides or RANDOM)), run_dir, IDENTITY)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "last.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_after_an_epoch_gives_identical_weights_and_metrics(make_cfg, tmp_path: Path, monkeypatch) -> None:
    straight = fit(make_cfg, tmp_path / "straight")

    original_save = Trainer.save_last

    def save_then_die(self: Trainer) -> None:
        original_save(self)
        if self.progress.epoch == 1:
            raise KeyboardInterrupt  # killed right after epoch 1 was checkpointed

    monkeypatch.setattr(Trainer, "save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "save_last", original_save)
    assert len(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == 1
    resumed = fit(make_cfg, tmp_path / "resumed")

    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    assert without_times(read_jsonl(tmp_path / "straight" / "metrics.jsonl")) == without_times(
        read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    )
    assert straight["test"] == resumed["test"]


@pytest.mark.parametrize(
    "data_path",
    [["data.on_device=true"], ["data.on_device=false"], ["data.policy=trivialaugment", "data.num_workers=2"]],
    ids=["on-device", "dataloader", "policy-workers"],
)
def test_resume_mid_epoch_gives_identical_weights(make_cfg, tmp_path: Path, monkeypatch, data_path: list) -> None:
    make_cfg = partial(make_cfg, *data_path)
    fit(make_cfg, tmp_path / "straight")
    original_step = Trainer.optimizer_step

    def stop_after_3_steps(self: Trainer, finite: bool) -> None:
        original_step(self, finite)
        if self.progress.step == 3:
            self.stop_requested = True  # what a preemption signal does

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_3_steps)
    assert fit(make_cfg, tmp_path / "resumed") == {}
    state = checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["batch"], state["progress"]["step"]) == (0, 3, 3)
    monkeypatch.setattr(Trainer, "optimizer_step", original_step)
    fit(make_cfg, tmp_path / "resumed")
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    assert without_times(read_jsonl(tmp_path / "straight" / "metrics.jsonl")) == without_times(
        read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    )


def test_finished_run_is_not_redone_and_a_changed_config_is_refused(make_cfg, tmp_path: Path) -> None:
    first = fit(make_cfg, tmp_path / "run")
    mtime = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    assert fit(make_cfg, tmp_path / "run") == first
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == mtime
    with pytest.raises(RunConflictError, match="different config"):
        fit(make_cfg, tmp_path / "run", *RANDOM, "smoothing=0.2")


def test_a_stop_during_the_last_step_of_an_epoch_is_honoured_after_it(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """With one step per epoch there is no step boundary inside an epoch: the stop comes after validation."""
    one_step = ["data.batch_size=1024", "trainer.epochs=3"]
    original_step = Trainer.optimizer_step

    def stop_in_the_first_step(self: Trainer, finite) -> None:
        original_step(self, finite)
        if self.progress.step == 1:
            self.stop_requested = True

    monkeypatch.setattr(Trainer, "optimizer_step", stop_in_the_first_step)
    assert fit(make_cfg, tmp_path / "run", *RANDOM, *one_step) == {}
    monkeypatch.undo()
    progress = checkpoint.load(tmp_path / "run" / "last.pt")["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 0, 1)
    assert [row["epoch"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    fit(make_cfg, tmp_path / "straight", *RANDOM, *one_step)
    fit(make_cfg, tmp_path / "run", *RANDOM, *one_step)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "run"))


def test_changed_config_cannot_resume_a_checkpoint(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: False)  # save and stop before any step
    fit(make_cfg, tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(RunConflictError, match=r"smoothing: 0.1 -> 0.2"):
        fit(make_cfg, tmp_path / "run", *RANDOM, "smoothing=0.2")


def test_corrupt_last_checkpoint_is_reported_loudly(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="last.pt is unreadable"):
        fit(make_cfg, run_dir)


def test_nonfinite_losses_are_skipped_then_stop_the_run(make_cfg, tmp_path: Path, monkeypatch) -> None:
    forward = VisionTransformer.forward
    calls = {"n": 0}

    def sometimes_nan(self, images):
        calls["n"] += self.training
        logits = forward(self, images)
        return logits * float("nan") if self.training and calls["n"] % 4 == 0 else logits

    monkeypatch.setattr(VisionTransformer, "forward", sometimes_nan)
    results = fit(make_cfg, tmp_path / "some", *RANDOM, "trainer.max_nonfinite=2")
    assert results["nonfinite_steps"] == 5  # every 4th of 2 x 10 steps was skipped
    assert checkpoint.load(tmp_path / "some" / "last.pt")["progress"]["step"] == 20  # steps taken or skipped
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "some").values())

    monkeypatch.setattr(VisionTransformer, "forward", lambda self, images: forward(self, images) * float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite for \d+ consecutive steps \(trainer.max_nonfinite=3\)"):
        fit(make_cfg, tmp_path / "all", *RANDOM, "trainer.max_nonfinite=3")
    assert not (tmp_path / "all" / "last.pt").exists() and not (tmp_path / "all" / "best.pt").exists()


@pytest.mark.parametrize("clip", ["trainer.clip_grad_norm=1", "trainer.clip_grad_norm=0"])
def test_nonfinite_gradients_skip_the_step_although_the_loss_is_finite(
    make_cfg, tmp_path: Path, monkeypatch, clip: str
) -> None:
    forward = VisionTransformer.forward
    calls = {"n": 0}

    def nan_gradients_sometimes(self, images):
        calls["n"] += self.training
        logits = forward(self, images)
        if self.training and calls["n"] % 4 == 0:
            logits.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite, its gradients do not
        return logits

    monkeypatch.setattr(VisionTransformer, "forward", nan_gradients_sometimes)
    results = fit(make_cfg, tmp_path / "run", *RANDOM, clip, "trainer.max_nonfinite=2")
    assert results["nonfinite_steps"] == 5
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_weights_that_turn_nonfinite_are_never_saved_and_fail_the_run(make_cfg, tmp_path: Path, monkeypatch) -> None:
    original_step = Trainer.optimizer_step

    def corrupt_in_epoch_2(self: Trainer, finite) -> None:
        original_step(self, finite)
        if self.progress.step == 15:  # e.g. a weight decay step that overflowed
            with torch.no_grad():
                self.model.head.bias[0] = float("inf")

    monkeypatch.setattr(Trainer, "optimizer_step", corrupt_in_epoch_2)
    with pytest.raises(NonFiniteError, match=r"weights became non-finite by step 20 \(head.bias\); last.pt was not"):
        fit(make_cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert checkpoint.load(run_dir / "last.pt")["progress"]["epoch"] == 1  # the last good checkpoint stays
    for name in ("last.pt", "best.pt"):
        assert all(torch.isfinite(w).all() for w in checkpoint.load(run_dir / name)["model"].values())
    assert not (run_dir / "results.json").exists()
    log = (run_dir / "train.log").read_text()  # the run's own log says why it ended, with the traceback
    assert "run failed" in log and "vitexp.guard.NonFiniteError: the weights became non-finite" in log


def test_diverging_run_fails_without_nonfinite_checkpoints_or_results(tmp_path: Path) -> None:
    """`optim.lr=1000` on digits: the default model diverges within its first epoch; the run fails cleanly."""
    run_dir = tmp_path / "run"
    result = run_train("data=digits", "logger=none", "optim.lr=1000", "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: loss or gradients were non-finite for" in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "results.json").exists()
    for path in run_dir.glob("*.pt"):
        assert all(torch.isfinite(w).all() for w in checkpoint.load(path)["model"].values()), path


def test_evaluation_records_no_autograd_history(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Validation and test keep no activations for backward: they would multiply the memory a run needs."""
    forward = VisionTransformer.forward
    eval_outputs: list[bool] = []

    def recording(self, images):
        logits = forward(self, images)
        if not self.training:
            eval_outputs.append(logits.requires_grad or torch.is_grad_enabled())
        return logits

    monkeypatch.setattr(VisionTransformer, "forward", recording)
    fit(make_cfg, tmp_path / "run")
    # val once per epoch, then the test and the figures' pass over it (2 batches each)
    assert len(eval_outputs) == 2 * 1 + 2 + 2 and not any(eval_outputs)


def test_gradient_accumulation_matches_a_large_batch(make_cfg, tmp_path: Path) -> None:
    deterministic = [
        "aug=none",
        "model.dropout=0",
        "trainer.epochs=1",
        "data.crop_scale=[1,1]",
        "data.crop_ratio=[1,1]",
        "data.hflip=0",
    ]
    fit(make_cfg, tmp_path / "big", *deterministic, "data.batch_size=128")
    fit(make_cfg, tmp_path / "accumulated", *deterministic, "data.batch_size=64", "trainer.accumulate=2")
    for name in ("big", "accumulated"):
        assert checkpoint.load(tmp_path / name / "last.pt")["progress"]["step"] == 10
    big, accumulated = final_weights(tmp_path / "big"), final_weights(tmp_path / "accumulated")
    for key in big:  # the same samples per step, so the same updates up to float summation order
        torch.testing.assert_close(accumulated[key], big[key], atol=2e-5, rtol=1e-4)


def test_a_directory_in_use_by_another_run_is_refused(make_cfg, tmp_path: Path) -> None:
    from filelock import FileLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FileLock(str(run_dir / ".run.lock")), pytest.raises(RunConflictError, match="in use by another running job"):
        fit(make_cfg, run_dir)
    assert not (run_dir / "last.pt").exists()


def test_bf16_autocast_path_trains(make_cfg, tmp_path: Path) -> None:
    results = fit(make_cfg, tmp_path / "run", "trainer.precision=bf16", "trainer.epochs=1")
    reference = fit(make_cfg, tmp_path / "fp32", "trainer.precision=fp32", "trainer.epochs=1")
    weights = final_weights(tmp_path / "run")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 master weights
    differs = [not torch.equal(w, final_weights(tmp_path / "fp32")[k]) for k, w in weights.items()]
    assert any(differs)  # the forward really ran in bf16
    assert results["test"]["loss"] == pytest.approx(reference["test"]["loss"], rel=0.05)  # and trained the same


def test_data_wait_is_the_share_of_each_epoch_spent_waiting_for_batches(
    make_cfg, tmp_path: Path, monkeypatch, caplog
) -> None:
    quick = fit(make_cfg, tmp_path / "quick", "aug=none")
    rows = read_jsonl(tmp_path / "quick" / "metrics.jsonl")
    assert all(0 <= row["data_wait"] < DATA_WAIT_WARNING for row in rows)  # indexing on-device data is no wait
    assert quick["data_wait"] == pytest.approx(sum(row["data_wait"] for row in rows) / len(rows))
    assert "waited for" not in caplog.text

    get_item, delay = TensorDataset.__getitem__, 0.0005

    def slow_item(self: TensorDataset, index: int):
        time.sleep(delay)  # a DataLoader that cannot keep up
        return get_item(self, index)

    monkeypatch.setattr(TensorDataset, "__getitem__", slow_item)
    fit(make_cfg, tmp_path / "slow", "aug=none", "data.on_device=false")
    images = checkpoint.load(tmp_path / "slow" / "last.pt")["progress"]["step"] // 2 * 128  # per epoch
    for row in read_jsonl(tmp_path / "slow" / "metrics.jsonl"):
        waited = row["data_wait"] * row["epoch_time_s"]
        assert images * delay <= waited < row["epoch_time_s"]
    assert "waited for DataLoader batches" in caplog.text and "data.num_workers" in caplog.text


def test_training_steps_read_nothing_from_the_device_between_log_intervals(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """Every read of a tensor's value (.item(), bool(), .tolist() ...) is a GPU sync; the loop makes none."""
    reads: list[str] = []
    inside = {"train_epoch": False}
    watched = ("vitexp/engine.py", "vitexp/guard.py", "vitexp/metrics.py")

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if inside["train_epoch"] and caller.co_filename.endswith(watched):
                reads.append(f"{name} in {caller.co_name}")
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train_epoch = Trainer.train_epoch

    def watched_epoch(self: Trainer, epoch: int) -> bool:
        inside["train_epoch"] = True
        try:
            return train_epoch(self, epoch)
        finally:
            inside["train_epoch"] = False

    monkeypatch.setattr(Trainer, "train_epoch", watched_epoch)
    fit(make_cfg, tmp_path / "quiet", *RANDOM, "trainer.log_every=1000", "trainer.clip_grad_norm=1")
    assert reads == []
    fit(make_cfg, tmp_path / "logged", *RANDOM, "trainer.log_every=5")
    assert reads and all(read.endswith(("read_nonfinite", "compute")) for read in reads)  # once per 5 steps


def test_a_run_started_by_the_previous_version_resumes(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Its checkpoint has an unfused optimizer and its metrics rows have no data_wait."""
    original_save = Trainer.save_last

    def save_then_die(self: Trainer) -> None:
        original_save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_last", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg, tmp_path / "run")
    monkeypatch.undo()
    last = tmp_path / "run" / "last.pt"
    state = checkpoint.load(last)
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    checkpoint.save(last, state)
    metrics = tmp_path / "run" / "metrics.jsonl"
    (row,) = read_jsonl(metrics)
    del row["data_wait"]
    metrics.write_text(json.dumps(row) + "\n")

    results = fit(make_cfg, tmp_path / "run")
    rows = read_jsonl(metrics)
    assert [r["epoch"] for r in rows] == [1, 2] and "data_wait" not in rows[0]
    assert results["data_wait"] == rows[1]["data_wait"]
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_a_per_image_policy_draws_the_same_whatever_the_workers(make_cfg, tmp_path: Path) -> None:
    """Each image's policy is seeded by (seed, epoch, index): 0 or 2 workers train the same weights."""
    for workers in (0, 2):
        fit(make_cfg, tmp_path / str(workers), *RANDOM, "data.policy=randaugment", f"data.num_workers={workers}")
    assert_same_weights(final_weights(tmp_path / "0"), final_weights(tmp_path / "2"))


class CountingHook(Hook):
    """Counts steps (checkpointed state), records epoch rows, and asks to finish after epoch 2."""

    def __init__(self) -> None:
        self.steps, self.epochs = 0, []

    def after_step(self, trainer: Trainer) -> None:
        self.steps += 1

    def after_epoch(self, trainer: Trainer, row: dict) -> None:
        self.epochs.append(row["epoch"])
        trainer.finish_early = row["epoch"] == 2

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


class ConstantModelHook(Hook):
    """Evaluates a model whose logits are all zero (it always predicts class 0) instead of the trained one."""

    def __init__(self) -> None:
        self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))

    def eval_model(self, trainer: Trainer) -> torch.nn.Module:
        self.model(torch.zeros(1, 3, 16, 16))  # materialise, then zero
        torch.nn.init.zeros_(self.model[1].weight)
        torch.nn.init.zeros_(self.model[1].bias)
        return self.model


def hooked_trainer(make_cfg, run_dir: Path, hooks: list[Hook]) -> Trainer:
    cfg = make_cfg(*BASE, "trainer.epochs=4")
    return Trainer(validate(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True), {}, hooks=hooks)


def test_hooks_run_at_the_loop_extension_points_and_are_checkpointed(make_cfg, tmp_path: Path) -> None:
    hook = CountingHook()
    trainer = hooked_trainer(make_cfg, tmp_path / "run", [hook])
    results = trainer.fit()
    assert hook.steps == 20 and hook.epochs == [1, 2]  # 10 steps an epoch; finished early after epoch 2
    assert [row["epoch"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert results["best_epoch"] in (1, 2)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["hooks"] == {"CountingHook": {"steps": 20}}  # by name
    state = checkpoint.load(tmp_path / "run" / "last.pt")

    class Stateless(Hook):
        """A hook added on resume (a figure, say): the checkpoint has no state for it, and needs none."""

    again = CountingHook()
    hooked_trainer(make_cfg, tmp_path / "again", [Stateless(), again]).load_state_dict(state)
    assert again.steps == 20
    earlier = CountingHook()  # an earlier version's checkpoint: a list by position, DataWaitWarning's first
    hooked_trainer(make_cfg, tmp_path / "old", [earlier, Stateless()]).load_state_dict(
        state | {"hooks": [{}, {"steps": 7}]}
    )
    assert earlier.steps == 7


def test_a_hook_can_choose_the_weights_that_are_evaluated_saved_and_tested(make_cfg, tmp_path: Path) -> None:
    trainer = hooked_trainer(make_cfg, tmp_path / "run", [ConstantModelHook()])
    results = trainer.fit()
    labels = {split: getattr(trainer.splits, split).tensors[1] for split in ("val", "test")}
    assert results["best_val"]["acc"] == pytest.approx((labels["val"] == 0).float().mean().item())
    assert results["test"]["acc"] == pytest.approx((labels["test"] == 0).float().mean().item())
    assert set(checkpoint.load(tmp_path / "run" / "best.pt")["model"]) == {"1.weight", "1.bias"}
