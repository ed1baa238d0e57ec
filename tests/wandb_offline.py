"""Read an offline W&B run back from its `run-<id>.wandb` file (wandb 0.31 writes no plain-text copies).

The file is a 7-byte header then LevelDB-log framing (32 KiB blocks; chunks `<crc u32><len u16><type u8>`,
type 1 full, 2 first, 3 middle, 4 last) of `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

MAGIC = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
BLOCK, HEADER = 32768, 7


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:7] != MAGIC:
        raise ValueError(f"not a .wandb file: {path}")
    pos, payload = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        if len(chunk) < length or kind == 0:
            break
        pos += length
        if kind in (1, 2):
            payload = chunk
        else:
            payload += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def _key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _read_once(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {},
        "summary": {},
        "history": [],
        "metrics": {},
        "artifacts": [],
        "exit_code": None,
    }
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out |= {
                "run_id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "job_type": run.job_type,
                "name": run.display_name,
                "tags": list(run.tags),
                "notes": run.notes,
            }
            out["config"] |= {_key(i): json.loads(i.value_json) for i in run.config.update}
        elif kind == "config":
            out["config"] |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"] |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "metric":  # wandb.define_metric: its step metric and summaries, by name or glob
            metric = record.metric
            summary = [name for name in ("min", "max", "mean", "last") if getattr(metric.summary, name)]
            out["metrics"][metric.name or metric.glob_name] = {"step_metric": metric.step_metric, "summary": summary}
        elif kind == "artifact":  # run.log_artifact: its manifest names each file's MD5 (base64) and staged copy
            artifact = record.artifact
            files = {
                entry.path: {"digest": entry.digest, "size": entry.size, "local_path": entry.local_path}
                for entry in artifact.manifest.contents
            }
            out["artifacts"].append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "aliases": list(artifact.aliases),
                    "metadata": json.loads(artifact.metadata or "{}"),
                    "files": files,
                }
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    return out


def read_offline_run(run_folder: Path, wait: float = 10.0) -> dict[str, Any]:
    """Config, summary, history, metric definitions, artifacts, ids, name, tags, notes and exit code of
    `.../wandb/offline-run-*`; waits for the exit record."""
    path = next(run_folder.glob("*.wandb"))
    deadline = time.monotonic() + wait
    while True:
        try:
            out = _read_once(path)
        except Exception:  # a record still being written
            out = {"exit_code": None}
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))
