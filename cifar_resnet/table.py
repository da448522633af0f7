"""The results table of a set of runs, in the write-up's columns: the sweep prints it at its end, and the report
writes it as `results.md`. Accuracies are shown in %; the run records and W&B keep fractions. `markdown` is the one
writer of a table, for these and for the benchmarks' tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .config import Config
from .records import (
    CLASS_COUNT,
    DATA_SOURCE,
    TEST_IMAGES,
    TRAIN_ACC,
    TRAIN_IMAGES,
    TRAIN_LOSS,
    VAL_IMAGES,
    VAL_LOSS,
    RunResult,
)

# The settings the write-up's table always shows, in its order (and the recipe, which decides what they mean); other
# settings appear when the sweep varies them.
TABLE_SETTINGS = {"learning_rate": "Learning Rate", "optimizer": "Optimizer", "batch_size": "Batch Size",
                  "recipe": "Recipe"}
SECONDS_PER_MINUTE = 60


def varied_settings(results: Sequence[RunResult]) -> list[str]:
    """The settings (Config fields, in their order) whose values differ between runs."""
    return [f.name for f in dataclasses.fields(Config)
            if len({repr(result.config.get(f.name)) for result in results}) > 1]


def by_val_acc(results: Sequence[RunResult]) -> list[RunResult]:
    """Best validation accuracy first; runs without one last."""
    return sorted(results, key=lambda result: -result.val_acc if result.val_acc is not None else math.inf)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, rest = divmod(round(seconds), SECONDS_PER_MINUTE)
    return f"{minutes}m {rest:02d}s" if minutes else f"{rest}s"


def setting_text(value: Any) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def data_description(data: dict[str, Any]) -> str:
    """`synthetic (5,000 train / 1,000 val / 1,000 test images, 10 classes)`: what a run trained and was tested on."""
    counts = [f"{data[key]:,} {name}" for key, name in ((TRAIN_IMAGES, "train"), (VAL_IMAGES, "val"),
                                                         (TEST_IMAGES, "test")) if data.get(key) is not None]
    details = [" / ".join(counts) + " images"] if counts else []
    if data.get(CLASS_COUNT) is not None:
        details.append(f"{data[CLASS_COUNT]} classes")
    return f"{data.get(DATA_SOURCE) or 'unknown'}" + (f" ({', '.join(details)})" if details else "")


def data_line(results: Sequence[RunResult]) -> str:
    """`data: ...`, naming each distinct data set the runs used, so that a result is read with its data."""
    counted = [result for result in results if result.data.get(TRAIN_IMAGES) is not None]
    # A run stopped before its data loaded knows only its source: the counted runs describe that data better.
    described = dict.fromkeys(data_description(result.data) for result in counted or results)
    return "data: " + "; ".join(described)


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of text cells, one row per line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(results: Sequence[RunResult]) -> str:
    """The write-up's results table, best validation accuracy first; the best run is marked. Its first line names
    the data."""
    settings = list(TABLE_SETTINGS) + [name for name in varied_settings(results) if name not in TABLE_SETTINGS]
    header = (["Run"] + [TABLE_SETTINGS.get(name, name) for name in settings]
              + ["Test Accuracy", "Train Accuracy", "Train Loss", "Val Accuracy", "Val Loss", "Epochs to Best",
                 "Run Time"])
    rows = []
    for rank, result in enumerate(by_val_acc(results)):
        run = f"**{result.run_id}** (best)" if rank == 0 and result.val_acc is not None else result.run_id
        if result.status != "finished":
            run += f" ({result.status})"
        cells = ([run] + [setting_text(result.config.get(name)) for name in settings] + [
            percent(result.test_acc), percent(result.at_best_epoch(TRAIN_ACC)),
            _number(result.at_best_epoch(TRAIN_LOSS)), percent(result.val_acc),
            _number(result.at_best_epoch(VAL_LOSS)), setting_text(result.best_epoch), duration_text(result.seconds),
        ])
        rows.append(cells)
    return f"{data_line(results)}\n\n{markdown(header, rows)}\n"
