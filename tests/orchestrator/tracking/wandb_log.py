"""Reading back what W&B wrote offline. W&B has no client API for offline runs (``wandb.Api`` talks to a server),
so this reads the run's transaction log, ``run-<id>.wandb``, with W&B's own protobuf messages
(``wandb.proto.wandb_internal_pb2.Record``). The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic
0xBEE1, version 0), then 32 KiB blocks of chunks, each a 7-byte header (CRC32C, length, type: 1 full, 2 first,
3 middle, 4 last) and its bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def read_run(run_dir: Path) -> dict:
    """{"name", "group", "job_type", "config": {...}, "history": [{...}], "summary": {...}, "artifacts": [names],
    "exit_code"} of one offline run folder (``offline-run-*``)."""
    log = next(Path(run_dir).glob("run-*.wandb"))
    run = {"history": [], "summary": {}, "config": {}, "artifacts": [], "exit_code": None}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                       id=rec.run.run_id)
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind == "artifact":
            run["artifacts"].append(rec.artifact.name)
            run.setdefault("artifact_files", []).extend(e.path for e in rec.artifact.manifest.contents)
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
    return run


def read_runs(wandb_dir: Path) -> list[dict]:
    return [read_run(d) for d in sorted(Path(wandb_dir).glob("offline-run-*"))]
