"""Real W&B in offline mode, read back from what it wrote; and the fallback when W&B is unreachable."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
import wandb
from PIL import Image

from tests.conftest import TINY, run_train
from tests.wandb_offline import offline_runs, read_offline_run
from vitexp import checkpoint, engine, run
from vitexp.config import ConfigError, validate
from vitexp.engine import NonFiniteError
from vitexp.models import VisionTransformer
from vitexp.samples import Layout

RUN = [
    *TINY,
    "data=digits",
    "trainer.epochs=2",
    "data.batch_size=128",
    "aug=cutmix",
    "smoothing=0.1",
    "logger=wandb",
    "logger.wandb.project=vitexp-tests",
    "logger.wandb.group=g1",
    "logger.wandb.init_timeout=5",
]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def md5_b64(data: bytes) -> str:
    """A file's digest as W&B's artifact manifests write it."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def wandb_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("wandb:")]


def test_offline_run_holds_config_history_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_SILENT", "WANDB_CONSOLE"):  # W&B's output as a user's shell gets it
        monkeypatch.delenv(key)
    run_dir = tmp_path / "run"
    shown = ["logger.wandb.tags=[mine,digits]", "logger.wandb.notes='a tiny run'", "logger.wandb.log_model=best"]
    overrides = [*RUN, "logger.wandb.mode=offline", "trainer.log_every=4", *shown]
    result = run_train(*overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    done = f"done: {run_dir / 'results.json'}; next: python -m vitexp.explain {run_dir} ; wandb sync {run_dir}/wandb"
    assert done in result.stdout  # where the results are and what comes next
    assert "sched.warmup_epochs=5 >= trainer.epochs=2" in result.stdout  # vitexp's warnings still show
    assert wandb_lines(result.stdout + result.stderr) == []  # logger.wandb.console=quiet: no W&B header or footer
    [folder] = offline_runs(run_dir)
    run = read_offline_run(folder)
    assert run["run_id"] == (run_dir / "wandb_id").read_text().strip()
    assert (run["project"], run["group"], run["job_type"], run["exit_code"]) == ("vitexp-tests", "g1", "vit", 0)
    assert run["tags"] == ["mine", "digits", "vit"]  # the shell's first, then data set and model, no repeats
    assert run["notes"] == "a tiny run"
    assert run["name"] == ",".join(o for o in overrides if not o.startswith("logger"))  # a single run: all of them
    config = run["config"]
    assert (config["model"], config["aug"], config["data"], config["smoothing"]) == ("vit", "cutmix", "digits", 0.1)
    assert config["model_config"]["dim"] == 32 and config["optim"]["lr"] == 1e-3
    assert config["params"] > 0
    epochs = [row for row in run["history"] if "epoch" in row]
    assert [row["epoch"] for row in epochs] == [1, 2] and [row["_step"] for row in epochs] == [10, 20]
    assert {"train/loss", "val/acc", "val/ece", "lr"} <= set(epochs[0])
    steps = [row for row in run["history"] if "train_step/lr" in row]  # every log_every optimizer steps
    assert [row["_step"] for row in steps] == [4, 8, 12, 16, 20]
    lrs = [row["train_step/lr"] for row in steps]
    assert lrs == sorted(lrs) and lrs[-1] == epochs[1]["lr"]  # warming up; the epoch's last step's rate
    assert all(0 < row["train_step/loss"] < 5 for row in steps)
    results = json.loads((run_dir / "results.json").read_text())
    assert run["summary"]["test/acc"] == pytest.approx(results["test"]["acc"])
    assert run["summary"]["params"] == results["params"]
    summary = run["summary"]  # results, not what the run was (that is its config)
    assert not {"seed", "smoothing", "device", "config_hash", "host", "started_at", "finished_at"} & set(summary)
    assert not any(key.startswith(("choices/", "config/")) for key in summary)
    metrics = run["metrics"]  # the dashboard's summary shows the best epoch so far while a run is going
    assert metrics["val/acc"] == {"step_metric": "epoch", "summary": ["max"]}
    assert metrics["val/loss"] == {"step_metric": "epoch", "summary": ["min"]}
    assert metrics["train/*"]["step_metric"] == "epoch"
    assert summary["val/acc"] == {"max": max(row["val/acc"] for row in epochs)}  # the best epoch, not the last

    for name in ("curves", "reliability", "confusion"):  # the run's figures, as image files
        [logged] = [row for row in run["history"] if f"figures/{name}._type" in row]
        assert logged[f"figures/{name}._type"] == "image-file"
        png = (run_dir / f"{name}.png").read_bytes()
        assert logged[f"figures/{name}.sha256"] == hashlib.sha256(png).hexdigest()
        assert (folder / "files" / logged[f"figures/{name}.path"]).read_bytes() == png

    [model] = run["artifacts"]  # logger.wandb.log_model=best, recorded offline for `wandb sync`
    assert (model["name"], model["type"]) == (f"model-{run['run_id']}", "model")
    assert set(model["aliases"]) == {"best", "latest"}
    best = (run_dir / "best.pt").read_bytes()
    [(path, entry)] = model["files"].items()
    assert (path, entry["digest"], entry["size"]) == ("best.pt", md5_b64(best), len(best))
    assert Path(entry["local_path"]).read_bytes() == best  # the staged copy sync uploads
    assert model["metadata"] == {
        "checkpoint": "best.pt",
        "config_hash": results["config_hash"],
        "choices": results["choices"],
        "best_epoch": results["best_epoch"],
        "best_val_acc": pytest.approx(results["best_val"]["acc"]),
        "test_acc": pytest.approx(results["test"]["acc"]),
    }


def test_console_full_shows_wandbs_footer_and_log_model_last_outlives_keep_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("WANDB_SILENT", "WANDB_CONSOLE"):
        monkeypatch.delenv(key)
    run_dir = tmp_path / "run"
    shown = ["logger.wandb.console=full", "logger.wandb.log_model=last", "trainer.keep_last=false"]
    result = run_train(*RUN, "trainer.epochs=1", "logger.wandb.mode=offline", *shown, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = wandb_lines(result.stderr)
    assert "wandb: Run summary:" in lines and "wandb: You can sync this run to the cloud by running:" in lines
    assert len(lines) > 20  # what console=quiet keeps off every job's log
    assert f"done: {run_dir / 'results.json'}" in result.stdout

    [model] = read_offline_run(offline_runs(run_dir)[0])["artifacts"]
    [(path, entry)] = model["files"].items()
    assert (path, model["metadata"]["checkpoint"], set(model["aliases"])) == ("last.pt", "last.pt", {"last", "latest"})
    assert "test_acc" not in model["metadata"]  # the test ran on best.pt
    assert not (run_dir / "last.pt").exists()  # deleted once finished; the artifact staged a copy before
    assert md5_b64(Path(entry["local_path"]).read_bytes()) == entry["digest"]


def test_unreachable_server_falls_back_to_offline_with_one_warning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    result = run_train(*RUN, f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "logging offline" in line]
    assert len(warnings) == 1 and "W&B is unreachable" in warnings[0]
    assert f"wandb sync {run_dir / 'wandb'}" in warnings[0]
    [folder] = offline_runs(run_dir)
    run = read_offline_run(folder)
    assert run["exit_code"] == 0 and len(run["history"]) == 2


def test_secrets_in_the_environment_reach_no_file_a_sweep_writes(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    secrets = {
        "WANDB_API_KEY": "local-" + "5ec7e7" * 8,
        "HF_TOKEN": "hf_tokenvalue0123456789",
        "MY_SERVICE_KEY": "service-key-9f8e7d6c5b4a",
    }
    env = secrets | {"WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}  # tries online, then goes offline
    result = run_train("-m", *RUN, "trainer.epochs=1", f"hydra.sweep.dir={sweep_dir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [path for path in sweep_dir.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"multirun.yaml", "report.md", "results.json", "config.yaml", "train.log"} <= names
    wandb_dirs = {path.relative_to(sweep_dir).parts[0] for path in written if path.suffix == ".wandb"}
    assert wandb_dirs == {"0", "wandb"}  # the job's W&B run and the report's
    for path in written:
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    for name, value in secrets.items():
        assert value not in result.stdout + result.stderr, f"{name} leaked into the log"


def test_missing_api_key_goes_offline_without_trying(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(*RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no W&B API key is configured; logging offline" in result.stdout + result.stderr
    assert len(offline_runs(run_dir)) == 1


@pytest.fixture
def fresh_wandb():
    wandb.teardown()  # W&B reads its environment once per process
    yield
    wandb.teardown()


def test_resumed_run_continues_the_same_wandb_run_and_a_failure_is_recorded(
    make_cfg, tmp_path: Path, monkeypatch, fresh_wandb
) -> None:
    cfg = make_cfg(*RUN, "logger.wandb.mode=offline")
    choices = run.RunIdentity({"model": "vit", "aug": "cutmix", "data": "digits"})
    forward = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: forward(self, x) * torch.nan)
    with pytest.raises(NonFiniteError):
        run.run(make_cfg(*RUN, "logger.wandb.mode=offline", "trainer.max_nonfinite=1"), tmp_path / "failed", choices)
    assert read_offline_run(offline_runs(tmp_path / "failed")[0])["exit_code"] == 1
    monkeypatch.undo()

    stop_once = {"done": False}
    original = engine.Trainer.optimizer_step

    def stop_after_two_steps(self, finite):
        original(self, finite)
        if self.progress.step == 2 and not stop_once["done"]:
            stop_once["done"] = self.stop_requested = True

    monkeypatch.setattr(engine.Trainer, "optimizer_step", stop_after_two_steps)
    assert run.run(cfg, tmp_path / "run", choices) == {}
    run.run(cfg, tmp_path / "run", choices)
    first, second = (read_offline_run(folder) for folder in offline_runs(tmp_path / "run"))
    assert first["run_id"] == second["run_id"] == (tmp_path / "run" / "wandb_id").read_text().strip()
    assert [row["epoch"] for row in first["history"] + second["history"]] == [1, 2]


def test_log_samples_logs_the_first_training_batch_once_and_trains_the_same_weights(
    make_cfg, tmp_path: Path, fresh_wandb
) -> None:
    identity = run.RunIdentity({"model": "vit", "aug": "cutmix", "data": "digits"})
    overrides = [*RUN, "trainer.epochs=1", "logger.wandb.mode=offline"]
    run.run(make_cfg(*overrides, "logger.wandb.log_samples=true"), tmp_path / "samples", identity)
    run.run(make_cfg(*overrides), tmp_path / "plain", identity)  # the key's default: false

    png = tmp_path / "samples" / "samples.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == Layout(8, 16).size  # 8 of the 128 images, 2 rows of 4
    [folder] = offline_runs(tmp_path / "samples")
    [logged] = [row for row in read_offline_run(folder)["history"] if "samples._type" in row]
    assert logged["samples._type"] == "image-file" and logged["_step"] == 0  # before the first step's row
    assert logged["samples.sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()  # the file itself
    assert (folder / "files" / logged["samples.path"]).read_bytes() == png.read_bytes()

    assert not (tmp_path / "plain" / "samples.png").exists()
    [plain] = offline_runs(tmp_path / "plain")
    assert not any(key.startswith("samples") for row in read_offline_run(plain)["history"] for key in row)
    # Drawing the batch put back every generator it drew from: the weights are bit-identical.
    drawn, not_drawn = (checkpoint.load(tmp_path / name / "last.pt")["model"] for name in ("samples", "plain"))
    assert drawn.keys() == not_drawn.keys()
    assert all(torch.equal(drawn[key], not_drawn[key]) for key in drawn)


def test_unknown_log_model_and_console_values_are_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match="logger.wandb.log_model='bestt' is not allowed: expected none, best or last"):
        validate(make_cfg(*RUN, "logger.wandb.log_model=bestt"))
    with pytest.raises(ConfigError, match="logger.wandb.console='loud' is not allowed: expected quiet or full"):
        validate(make_cfg(*RUN, "logger.wandb.console=loud"))
    validate(make_cfg(*RUN, "logger.wandb.log_model=none"))  # as the shell writes "off"
