"""The run record: one small JSON file per run (`record.json`, next to its checkpoints) with the config, the
per-epoch history, the summary and the status. The sweep runner, the report and resume all read it; W&B gets
the same numbers."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write_json

RECORD_FILE = "record.json"
STATUSES = ("running", "finished", "failed", "preempted")


@dataclass
class RunRecord:
    run_id: str
    config: dict[str, Any]
    status: str = "running"
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch, W&B's metric names
    summary: dict[str, Any] = field(default_factory=dict)  # best epoch, test metrics, parameter count, ...
    error: str | None = None
    started_at: float = field(default_factory=time.time)  # Unix seconds
    updated_at: float = field(default_factory=time.time)

    def save(self, run_dir: Path) -> None:
        self.updated_at = time.time()
        atomic_write_json(run_dir / RECORD_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        return cls(**json.loads((run_dir / RECORD_FILE).read_text()))
