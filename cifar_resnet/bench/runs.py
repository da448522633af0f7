"""Whole runs without W&B, each in its own process: `cifar-resnet bench run` (one run, its best weights tested
without TTA, with flip TTA and with flip plus 1 px shifts), `cifar-resnet bench grid` (the write-up's six cells
beside its published table), and the concurrent runs of the benchmark's runs-per-hour figure.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import Config
from ..engine.device import select_device
from ..engine.evaluation import evaluate_test
from ..errors import UserError
from ..files import atomic_write_json
from ..records import (
    BEST_EPOCH,
    EPOCH_SECONDS,
    RUN_SECONDS,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_SECOND,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    RunResult,
    read_record,
    result_from_record,
)
from ..run_contract import EXIT_CRASH, EXIT_OK, run_folder
from ..runner import run_training
from ..table import markdown_table
from .machine import machine_info, seconds_since_process_start
from .spawn import SECONDS_PER_HOUR, print_settings_help, spawn_runs
from .writeup import WRITEUP_TABLE

log = logging.getLogger(__name__)


def measure_concurrency(config: Config, count: int, work_dir: Path) -> dict[str, Any]:
    """`count` full runs at once on this device (seeds differ): runs per hour, and each run's time and accuracy."""
    jobs = [(f"concurrent{count}-{i}", config.replace(seed=config.seed + i)) for i in range(count)]
    log.info("%d concurrent runs of %d epochs", count, config.epochs)
    results, wall_s = spawn_runs(jobs, count, work_dir / f"concurrent{count}")
    finished = [r for r in results if r.get("status") != "failed"]
    return {
        "wall_s": wall_s,
        "runs_per_hour": len(finished) * SECONDS_PER_HOUR / wall_s,
        "failed": len(results) - len(finished),
        "process_s": [r["process_s"] for r in finished],
        "test_acc": [r["test_acc"] for r in finished],
    }


# The test accuracies `bench run` reports for each run, whatever its own tta settings: (tta, translate_px). The run's
# own test (`test/acc` in its record) is the one of these its settings name.
TEST_VIEWS = {"test_acc": (False, 0), "test_acc_tta": (True, 0), "test_acc_tta_shift1": (True, 1)}
AT_BEST_EPOCH = (TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS)  # reported as the run's record has them at its best epoch


def run_one(config: Config, run_id: str) -> dict[str, Any]:
    """One run through the runner (files, no W&B), its best weights tested without TTA, with flip TTA and with flip
    plus 1 px shifts TTA; beside them, the run's record at its best epoch, under the record's names.

    `process_s` is taken when the run ends, before the extra tests (not part of a run)."""
    outcome = run_training(config, run_id)
    process_s = seconds_since_process_start()  # the run as a user sees it: interpreter, imports, data, all
    device = select_device(config.device)
    own_views = (config.tta, config.tta_translate_px)  # the run's own test has these: not tested twice
    tested = {name: outcome.fit.test.acc if views == own_views else
              evaluate_test(config.replace(tta=views[0], tta_translate_px=views[1]), outcome.fit.model, outcome.data,
                            device).acc
              for name, views in TEST_VIEWS.items()}
    run = result_from_record(outcome.record)
    return {
        "run_id": run_id,
        "config": config.to_dict(),
        **tested,
        **{metric: run.at_best_epoch(metric) for metric in AT_BEST_EPOCH},
        BEST_EPOCH: run.best_epoch,
        RUN_SECONDS: run.seconds,
        "process_s": process_s,
        "epoch_s": run.curve(EPOCH_SECONDS)[1],
        "train_images_per_s": statistics.median(run.curve(TRAIN_IMAGES_PER_SECOND)[1]),
    }


def run_grid(base: Config, workers: int, folder: Path) -> dict[str, Any]:
    jobs = [(f"{cell['optimizer']}-lr{cell['learning_rate']}",
             base.replace(optimizer=cell["optimizer"], learning_rate=cell["learning_rate"])) for cell in WRITEUP_TABLE]
    device = select_device(base.device)
    machine = machine_info(device)
    log.info("six cells, %d at a time, on %s", workers, device)
    results, wall_s = spawn_runs(jobs, workers, folder)
    cells = [{"writeup": writeup, "ours": ours} for writeup, ours in zip(WRITEUP_TABLE, results, strict=True)]
    return {"machine": machine, "config": base.to_dict(), "workers": workers, "wall_s": wall_s,
            "cells": cells}


def grid_table(result: dict[str, Any], runs: Sequence[RunResult]) -> str:
    """The cells' runs in the results table a sweep prints (`runs`, from their records), then each cell's test
    accuracy beside the write-up's published one."""
    lines = [f"six cells on {result['machine']['device_name']}, {result['workers']} at a time: "
             f"{result['wall_s']:.1f} s wall", "", markdown_table(runs) if runs else "no run left a record",
             f"{'cell':<16}{'write-up test':>14}{'ours test':>11}{'ours TTA':>10}{'process s':>11}"]
    for cell in result["cells"]:
        writeup, ours = cell["writeup"], cell["ours"]
        name = f"{writeup['optimizer']} {writeup['learning_rate']}"
        if ours.get("status") == "failed":
            lines.append(f"{name:<16}{writeup[TEST_ACC]:>14.2%}  failed (exit {ours['exit_code']}, "
                         f"log {ours['log']})")
            continue
        lines.append(f"{name:<16}{writeup[TEST_ACC]:>14.2%}{ours['test_acc']:>11.2%}{ours['test_acc_tta']:>10.2%}"
                     f"{ours['process_s']:>11.1f}")
    return "\n".join(lines)


def cell_runs(base: Config, result: dict[str, Any]) -> list[RunResult]:
    """The cells' runs as their records have them (a run that failed before writing one is left out)."""
    records = [read_record(run_folder(base.output_dir, cell["ours"]["run_id"])) for cell in result["cells"]]
    return [result_from_record(record) for record in records if record is not None]


def run_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cifar-resnet bench run", add_help=False, allow_abbrev=False)
    parser.add_argument("--run_id", required=True)
    parser.add_argument("--result", required=True, help="JSON file the run's results are written to")
    if "-h" in argv or "--help" in argv:
        print("usage: cifar-resnet bench run --run_id=ID --result=FILE [--name=value ...]\n\nOne training run "
              "through the runner (checkpoints and record.json in output_dir/ID), without W&B; its best weights "
              "are tested without TTA, with flip TTA and with flip plus 1 px shifts TTA.\n")
        print_settings_help("cifar-resnet bench run")
        return 0
    args, rest = parser.parse_known_args(list(argv))
    config = Config.from_argv(rest)
    atomic_write_json(Path(args.result), run_one(config, args.run_id))
    return 0


def grid_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cifar-resnet bench grid", allow_abbrev=False,
        description="The write-up's six cells (learning rate 0.001, 0.0005, 0.0001 x adam, sgd), each run in its own "
        "process without W&B, beside the write-up's table. Any `cifar-resnet train` setting applies to every cell.")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time on this device (default 1)")
    parser.add_argument("--out", default="grid.json", help="JSON file of the results (default: grid.json)")
    parser.add_argument("--runs_dir", default="", help="the cells' run folders and logs (default: next to --out)")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
        print_settings_help("cifar-resnet bench grid")
        return 0
    args, rest = parser.parse_known_args(list(argv))
    out = Path(args.out)
    folder = Path(args.runs_dir) if args.runs_dir else out.parent / f"{out.stem}-runs"
    base = Config.from_argv(rest, base=Config(output_dir=str(folder / "runs")))
    if args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    result = run_grid(base, args.workers, folder)
    atomic_write_json(out, result)
    print(grid_table(result, cell_runs(base, result)))
    print(f"\nwritten: {out}")
    return EXIT_CRASH if any(cell["ours"].get("status") == "failed" for cell in result["cells"]) else EXIT_OK


