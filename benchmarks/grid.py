"""`python -m benchmarks.grid`: the write-up's six cells (learning rate 0.001, 0.0005, 0.0001 x adam, sgd) as an
offline sweep, --workers at a time, each cell a `benchmarks.run` (no W&B), beside the write-up's published table.
Any `cifar-resnet train` setting applies to every cell.

Printed: the cells' runs as the sweep's results table (its first line names their data), then each cell's test
accuracy beside the write-up's, under a line naming the data of each column: the write-up's figures are its own, on
the original CIFAR-10, whatever data the cells trained on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_resnet.config import Config
from cifar_resnet.engine.device import select_device
from cifar_resnet.errors import UserError
from cifar_resnet.files import atomic_write_json
from cifar_resnet.records import (
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    RunFolder,
    RunResult,
    read_record,
    result_from_record,
)
from cifar_resnet.run_contract import EXIT_CRASH, EXIT_OK
from cifar_resnet.table import data_line, markdown, markdown_table
from cifar_resnet.threads import set_cpu_threads

from .cli import run_script, settings_from, settings_parser, start_logging
from .launch import sweep_runs
from .machine import machine_info, provenance
from .writeup import WRITEUP_TABLE

log = logging.getLogger(__name__)

WRITEUP_DATA = "its table as published, on the original CIFAR-10 (PNG images) with its own pipeline"


def cell_id(cell: dict[str, Any]) -> str:
    return f"{cell['optimizer']}-lr{cell['learning_rate']}"


def run_grid(base: Config, workers: int, folder: Path) -> tuple[dict[str, Any], list[RunResult]]:
    """The six cells through an offline sweep in `folder`: the results (the data the runs used among them), and
    the runs as their records have them."""
    jobs = [(cell_id(cell), base.replace(optimizer=cell["optimizer"], learning_rate=cell["learning_rate"]))
            for cell in WRITEUP_TABLE]
    machine = machine_info(select_device(base.device))
    log.info("six cells, %d at a time, on %s", workers, machine["device"])
    results, wall_s = sweep_runs(jobs, workers, folder, "writeup-grid")
    runs = cell_runs(folder, [run_id for run_id, _ in jobs])
    result = {"machine": machine, "config": base.to_dict(), "workers": workers, "wall_s": wall_s,
              "data": data_line(runs).removeprefix("data: ") if runs else base.dataset,
              "cells": [{"writeup": writeup, "ours": ours}
                        for writeup, ours in zip(WRITEUP_TABLE, results, strict=True)]}
    return result, runs


def cell_runs(folder: Path, run_ids: Sequence[str]) -> list[RunResult]:
    """The cells' runs as their records have them (a run that failed before writing one is left out)."""
    records = [read_record(RunFolder.of(folder, run_id).path) for run_id in run_ids]
    return [result_from_record(record) for record in records if record is not None]


def data_header(result: dict[str, Any]) -> str:
    """The line above the comparison: the data of each column, and a warning where they cannot compare."""
    ours = result.get("data") or result["config"]["dataset"]  # results stored before 2026-12 name no data
    line = f"write-up: {WRITEUP_DATA}. ours: {ours}."
    if result["config"]["dataset"] == "synthetic":
        line += " Different data: the write-up's columns are no baseline for ours."
    return line


def grid_markdown(result: dict[str, Any]) -> str:
    """Each cell's figures beside the write-up's published ones, under the line naming each column's data."""
    config = result["config"]
    rows = []
    for cell in result["cells"]:
        writeup, ours = cell["writeup"], cell["ours"]
        name = [str(writeup["learning_rate"]), writeup["optimizer"], f"{writeup[TEST_ACC]:.2%}"]
        if ours.get("status") == "failed":
            rows.append([*name, f"failed (exit {ours['exit_code']}, log {ours['log']})", "", "", "", "", "", ""])
            continue
        rows.append([*name, f"{ours['test_acc']:.2%}", f"{ours['test_acc_tta']:.2%}",
                     f"{writeup[TRAIN_ACC]:.2%} / {ours[TRAIN_ACC]:.2%}",
                     f"{writeup[TRAIN_LOSS]:.4f} / {ours[TRAIN_LOSS]:.4f}",
                     f"{writeup[VAL_ACC]:.2%} / {ours[VAL_ACC]:.2%}",
                     f"{writeup[VAL_LOSS]:.4f} / {ours[VAL_LOSS]:.4f}", f"{ours['process_s']:.1f}"])
    head = (f"recipe={config['recipe']}, width {config['width']}, {config['epochs']} epochs, batch "
            f"{config['batch_size']}; {result['workers']} at a time, {result['wall_s']:.1f} s wall for the six. "
            f"Machine: {provenance(result['machine'])}.")
    return f"{head}\n\n{data_header(result)}\n\n" + markdown(
        ["learning rate", "optimizer", "write-up test", "ours test", "ours test, flip TTA",
         "train acc (write-up / ours)", "train loss", "val acc", "val loss", "ours, s from process start"], rows)


def main(argv: Sequence[str]) -> int:
    parser = settings_parser("python -m benchmarks.grid", "[--workers=N] [--out=FILE] [--runs_dir=DIR]",
                             __doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="runs at a time on this device (default 1)")
    parser.add_argument("--out", default="grid.json", help="JSON file of the results (default: grid.json)")
    parser.add_argument("--runs_dir", default="", help="the sweep's folder: its runs' folders and logs (default: "
                        "next to --out)")
    args = parser.parse_args(list(argv))
    if args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    set_cpu_threads()
    out = Path(args.out)
    folder = Path(args.runs_dir) if args.runs_dir else out.parent / f"{out.stem}-runs"
    base = settings_from(args, base=Config(output_dir=str(folder)))
    result, runs = run_grid(base, args.workers, folder)
    atomic_write_json(out, result)
    print(markdown_table(runs) if runs else "no run left a record")
    print(f"{grid_markdown(result)}\n\nwritten: {out}")
    return EXIT_CRASH if any(cell["ours"].get("status") == "failed" for cell in result["cells"]) else EXIT_OK


if __name__ == "__main__":
    start_logging()
    sys.exit(run_script(main))
