"""Sweep files of the conftest's tiny run, the folder a sweep file's runs go to, a sweep's state and results table
as a test reads them, and how long a sweep's processes are waited for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cifar_resnet.config import Config
from cifar_resnet.sweep.plan import default_output_dir, load_sweep

SIGNAL_TIMEOUT_SECONDS = 120  # for a sweep process to stop after a signal
PROCESS_TIMEOUT_SECONDS = 300  # for a sweep process to end
SHORT_LEASE_SECONDS = 3.0  # a run's lease that runs out within a test

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


def write_one_run_sweep(path: Path) -> dict:
    sweep = {"method": "grid", "program": "cifar_resnet.train", "parameters": {"seed": {"value": 1}},
             "command": ["${env}", "${interpreter}", "-m", "${program}", "${args}"]}
    path.write_text(yaml.safe_dump(sweep))
    return sweep


def folder_of(sweep_file: Path, *overrides: str) -> Path:
    return default_output_dir(load_sweep(sweep_file, overrides))


def sweep_state(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "sweep.json").read_text())


def table_rows(stdout: str) -> list[str]:
    """The data rows of the Markdown results table."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return lines[1:]
