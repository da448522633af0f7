"""The results table (table.py): a run's row reports its best epoch, not its last."""

from __future__ import annotations

from cifar_resnet.records import RunResult
from cifar_resnet.table import markdown_table


def test_the_table_reports_the_best_epoch_not_the_last():
    history = [{"epoch": 1, "train/loss": 1.0, "train/acc": 0.6, "val/loss": 0.9, "val/acc": 0.7},
               {"epoch": 2, "train/loss": 0.5, "train/acc": 0.8, "val/loss": 1.2, "val/acc": 0.65}]
    result = RunResult("abc", "finished", {"learning_rate": 0.001, "optimizer": "adam", "batch_size": 128},
                       history, {"best_epoch": 1, "test/acc": 0.69}, 75.0)

    row = markdown_table([result]).splitlines()[4]

    assert row == ("| **abc** (best) | 0.001 | adam | 128 | – | 69.00% | 60.00% | 1.0000 | 70.00% | 0.9000 | 1 | "
                   "1m 15s |")
