"""Read the records of an offline W&B run's transaction log (`run-<id>.wandb`), to check what a run really sent.

The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) after a 7-byte W&B header; each record is
a `wandb_internal_pb2.Record` protobuf. wandb's Go core writes it; this reader is for tests only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER_BYTES = 7  # b":W&B", magic 0xBEE1, version
BLOCK_BYTES = 32 * 1024
CHUNK_HEADER_BYTES = 7  # crc32c (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, offset = [], b"", HEADER_BYTES
    while offset + CHUNK_HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - offset % BLOCK_BYTES
        if left_in_block < CHUNK_HEADER_BYTES:  # block trailer: padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, offset)
        chunk = data[offset + CHUNK_HEADER_BYTES : offset + CHUNK_HEADER_BYTES + length]
        offset += CHUNK_HEADER_BYTES + length
        if kind == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_run_file(wandb_dir: Path, run_id: str) -> Path:
    (path,) = wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    return path


def offline_runs(wandb_dir: Path, run_id: str) -> list[list]:
    """The records of each offline run of `run_id`, oldest first (one per attempt)."""
    return [read_records(path) for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))]


def logged_epochs(records: list) -> list[int]:
    return [int(json.loads(item.value_json)) for r in records if r.HasField("history")
            for item in r.history.item if (item.key or "/".join(item.nested_key)) == "epoch"]
