"""Reads what a W&B run wrote to its `.wandb` file, so tests check the real run files, not a mock.

wandb 0.31 no longer ships a Python reader for offline runs. The file is a LevelDB-style log: a 7-byte
header (`:W&B`, magic, version), then 32 KiB blocks of records (crc32 u32, length u16, type u8, payload),
each payload a `wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:
            break


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict:
    """{'config': {...}, 'history': [{...}], 'summary': {...}, 'run': {'id', 'name', 'group'}, 'exit_code': int
    or None (the run was never finished), 'artifacts': [{'type', 'name', 'aliases', 'files'}]} from an offline
    run folder."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run = {"config": {}, "history": [], "summary": {}, "run": {}, "exit_code": None, "artifacts": []}
    for payload in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "config":
            run["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            r = record.run
            run["run"] = {"id": r.run_id, "name": r.display_name, "group": r.run_group, "project": r.project}
        elif kind == "artifact":
            a = record.artifact
            files = sorted(entry.path for entry in a.manifest.contents)
            run["artifacts"].append({"type": a.type, "name": a.name, "aliases": list(a.aliases), "files": files})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run
