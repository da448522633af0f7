"""`python -m benchmarks.markdown FILE...`: the Markdown tables of stored results, for BENCHMARKS.md, as the script
that wrote each prints them: `benchmarks.bench` (a benchmark cut short included), `benchmarks.grid` and
`benchmarks.run` (a run's figures under the names of its record, `cifar_resnet.records`).

    python -m benchmarks.markdown gpu-check/bench.json gpu-check/full10.json gpu-check/grid*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_resnet.records import BEST_EPOCH, RUN_SECONDS, TEST_ACC, TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

from .bench import benchmark_markdown
from .grid import grid_markdown

# Bench's own names for a run's figures in the JSON stored before 2026-11-30 (benchmarks/results/): read as the
# record's names, which bench has written since.
STORED_NAMES = {"train_acc": TRAIN_ACC, "train_loss": TRAIN_LOSS, "val_acc": VAL_ACC, "val_loss": VAL_LOSS,
                "run_s": RUN_SECONDS}
STORED_WRITEUP_NAMES = {**STORED_NAMES, "test_acc": TEST_ACC}  # the write-up's table (bench keeps `test_acc` its own)


def record_names(figures: dict[str, Any], names: dict[str, str] = STORED_NAMES) -> dict[str, Any]:
    return {names.get(name, name): value for name, value in figures.items()}


def stored_grid(result: dict[str, Any]) -> dict[str, Any]:
    """A grid's results with its runs' figures under the record's names, whenever it was stored."""
    cells = [{"writeup": record_names(cell["writeup"], STORED_WRITEUP_NAMES), "ours": record_names(cell["ours"])}
             for cell in result["cells"]]
    return {**result, "cells": cells}


def run_markdown(result: dict[str, Any]) -> str:
    result = record_names(result)
    config = result["config"]
    return (f"Run {result['run_id']} (recipe={config['recipe']}, {config['optimizer']} {config['learning_rate']}, "
            f"width {config['width']}, {config['epochs']} epochs, {config['dataset']}, {config['device']}): "
            f"{result['process_s']:.1f} s from process start ({result[RUN_SECONDS]:.1f} s in the runner), "
            f"{result['train_images_per_s']:.0f} training images/s (median epoch), test acc {result['test_acc']:.2%}, "
            f"{result['test_acc_tta']:.2%} with flip TTA, best epoch {result[BEST_EPOCH]}.")


def render(result: dict[str, Any]) -> str:
    if "peak" in result:
        return benchmark_markdown(result)
    if "cells" in result:
        return grid_markdown(stored_grid(result))
    if "process_s" in result:
        return run_markdown(result)
    raise ValueError("not a JSON of benchmarks.bench, .grid or .run (the other scripts print their own tables)")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.markdown",
                                     description="The Markdown tables of stored results, for BENCHMARKS.md.")
    parser.add_argument("paths", nargs="+", metavar="FILE", help="a JSON of benchmarks.bench, .grid or .run")
    for path in parser.parse_args(argv).paths:
        try:
            table = render(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as error:  # json's errors are ValueErrors
            parser.exit(2, f"error: {path}: {error}\n")
        print(f"<!-- {path} -->\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
