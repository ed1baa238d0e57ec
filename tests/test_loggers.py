"""Logger sinks: the metrics files always, TensorBoard's event files and W&B's offline run read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY, run_train
from tests.wandb_offline import offline_runs, read_offline_run
from vitexp.config import ConfigError, validate
from vitexp.logger import RunIdentity, Sinks, read_jsonl
from vitexp.tensorboard_logger import TensorBoardConfig, TensorBoardSink

RUN = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "aug=cutmix", "smoothing=0.1"]


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_wandb_and_tensorboard_at_once_log_what_the_metrics_files_hold(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        *RUN, "logger=[wandb,tensorboard]", "logger.wandb.mode=offline", "optim.lr=2e-3", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    results = json.loads((run_dir / "results.json").read_text())
    board = run_dir / "tensorboard"
    for tag in ("val/acc", "train/loss", "lr", "data_wait"):
        assert scalars(board, tag) == pytest.approx({row["epoch"]: row[tag] for row in rows}, rel=1e-6)
    assert scalars(board, "test/acc") == pytest.approx({2: results["test"]["acc"]})
    assert scalars(board, "best_val/acc") == pytest.approx({2: results["best_val"]["acc"]})
    events = EventAccumulator(str(board))
    events.Reload()
    [hparams] = [
        content for tag, content in events.PluginTagToContent("hparams").items() if tag.endswith("session_start_info")
    ]
    assert b"cutmix" in hparams and b"optim.lr" in hparams  # the settings a sweep compares
    [folder] = offline_runs(run_dir)
    wandb_run = read_offline_run(folder)
    assert [row["val/acc"] for row in wandb_run["history"]] == [row["val/acc"] for row in rows]
    assert wandb_run["summary"]["test/acc"] == results["test"]["acc"]
    assert wandb_run["name"].endswith(",smoothing=0.1,optim.lr=2e-3") and wandb_run["job_type"] == "vit"


def test_tensorboard_alone_and_no_logger_write_the_metrics_files(tmp_path: Path) -> None:
    result = run_train(*RUN, "trainer.epochs=1", "logger=tensorboard", f"hydra.run.dir={tmp_path / 'tb'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "tb" / "wandb").exists()
    rows = read_jsonl(tmp_path / "tb" / "metrics.jsonl")
    assert scalars(tmp_path / "tb" / "tensorboard", "val/acc") == pytest.approx({1: rows[0]["val/acc"]})
    result = run_train(*RUN, "trainer.epochs=1", "logger=none", f"hydra.run.dir={tmp_path / 'none'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1].endswith(f"next: python -m vitexp.explain {tmp_path / 'none'}")
    assert {path.name for path in (tmp_path / "none").iterdir()} == {
        ".hydra",
        ".run.lock",
        "best.pt",
        "confusion.png",
        "curves.png",
        "figures.json",
        "last.pt",
        "metrics.jsonl",
        "reliability.png",
        "results.json",
        "train.log",
    }


def test_a_resumed_tensorboard_run_drops_the_epochs_its_checkpoint_lacks(tmp_path: Path) -> None:
    """A run killed after logging epoch 3 but before checkpointing it resumes from epoch 2: TensorBoard must
    show the retrained epoch 3 only, as metrics.jsonl does."""
    config = {"smoothing": 0.0, "seed": 0}
    identity = RunIdentity({"model": "vit"})

    def sink() -> TensorBoardSink:
        return TensorBoardSink(TensorBoardConfig(), tmp_path, config, identity, params=None)

    first = sink()
    first.start(0)
    for epoch in (1, 2, 3):
        first.log_epoch({"epoch": epoch, "val/acc": epoch / 10})
    first.finish(exit_code=1)
    resumed = sink()
    resumed.start(2)
    resumed.log_epoch({"epoch": 3, "val/acc": 0.9})
    resumed.finish(exit_code=0)
    assert scalars(tmp_path / "tensorboard", "val/acc") == pytest.approx({1: 0.1, 2: 0.2, 3: 0.9})


def test_the_report_logs_its_table_and_images_to_tensorboard(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    fig.savefig(tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    identity = RunIdentity({}, role="report", sweep_dir=tmp_path)
    sinks = Sinks.build({"tensorboard": TensorBoardConfig()}, tmp_path, {}, identity)
    sinks.log_media({"sweep_report": [{"aug": "none", "acc": 0.5}, {"aug": "cutmix", "acc": 0.75}]}, {})
    sinks.log_media({}, {"plot": tmp_path / "plot.png"})
    sinks.finish(exit_code=0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    [image] = events.Images("plot")
    assert (image.width, image.height) == (100, 50)
    [table] = events.Tensors("sweep_report/text_summary")
    assert b"| cutmix | 0.75 |" in table.tensor_proto.string_val[0]


@pytest.mark.parametrize(
    "override,message",
    [
        ("+logger.foo.x=1", "logger.foo is not a logger: expected one of"),
        ("logger.tensorboard.dir=/abs", "logger.tensorboard.dir='/abs' is not allowed: expected a path inside"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode='sometimes' is not allowed"),
        ("logger.wandb.name=tensorboard", "logger.wandb.name='tensorboard' has the schema TensorBoardConfig"),
    ],
)
def test_bad_sink_settings_are_refused(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(make_cfg("logger=[wandb,tensorboard]", override))
