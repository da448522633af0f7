"""Sweep files of the conftest's tiny run, and a sweep's state and results table as a test reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cifar_resnet.config import Config

GRID = {"learning_rate": {"values": [0.001, 0.0005]}, "optimizer": {"values": ["adam", "sgd"]}}


def tiny_settings(config: Config, epochs: int = 1) -> dict[str, Any]:
    """The conftest's tiny run as fixed sweep parameters."""
    names = ("dataset", "width", "batch_size", "eval_batch_size", "val_size", "train_size", "test_size", "device")
    return {name: {"value": getattr(config, name)} for name in names} | {"epochs": {"value": epochs}}


def write_sweep(path: Path, parameters: dict[str, Any], method: str = "grid", **extra: Any) -> Path:
    sweep = {
        "program": "cifar_resnet.train", "method": method, "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": parameters, "command": ["${env}", "${interpreter}", "-m", "${program}", "${args}"], **extra,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep_state(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "sweep.json").read_text())


def table_rows(stdout: str) -> list[str]:
    """The data rows of the Markdown results table."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return lines[1:]
