"""`python -m benchmarks.run`: one training run through the runner (checkpoints and record.json in
output_dir/RUN_ID), without W&B; its best weights are then tested without TTA, with flip TTA and with flip plus 1 px
shifts TTA. Its results go to RUN_ID's folder as bench-run.json (or --result). The run id is --run_id, else
WANDB_RUN_ID (what a sweep gives its runs: this is the command of the benchmarks' sweeps, `launch.py`).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_resnet.config import Config
from cifar_resnet.engine.device import select_device
from cifar_resnet.engine.evaluation import evaluate_test
from cifar_resnet.errors import UserError
from cifar_resnet.files import atomic_write_json
from cifar_resnet.names import RUN_ID_VARIABLE, check_run_id, requested_run_id
from cifar_resnet.records import (
    BEST_EPOCH,
    EPOCH_SECONDS,
    RUN_SECONDS,
    TRAIN_ACC,
    TRAIN_IMAGES_PER_SECOND,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
    RunFolder,
    result_from_record,
)
from cifar_resnet.runner import run_training
from cifar_resnet.threads import set_cpu_threads

from .cli import run_script, settings_from, settings_parser, start_logging
from .machine import seconds_since_process_start

RESULT_FILE = "bench-run.json"  # in the run's folder, written last: the run and its extra tests are done
# The test accuracies reported for each run, whatever its own tta settings: (tta, translate_px). The run's own test
# (`test/acc` in its record) is the one of these its settings name.
TEST_VIEWS = {"test_acc": (False, 0), "test_acc_tta": (True, 0), "test_acc_tta_shift1": (True, 1)}
AT_BEST_EPOCH = (TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS)  # reported as the run's record has them at its best epoch


def run_one(config: Config, folder: RunFolder) -> dict[str, Any]:
    """One run through the runner (files, no W&B), its best weights tested without TTA, with flip TTA and with flip
    plus 1 px shifts TTA; beside them, the run's record at its best epoch, under the record's names.

    `process_s` is taken when the run ends, before the extra tests (not part of a run)."""
    outcome = run_training(config, folder)
    process_s = seconds_since_process_start()  # the run as a user sees it: interpreter, imports, data, all
    device = select_device(config.device)
    own_views = (config.tta, config.tta_translate_px)  # the run's own test has these: not tested twice
    tested = {name: outcome.fit.test.acc if views == own_views else
              evaluate_test(config.replace(tta=views[0], tta_translate_px=views[1]), outcome.fit.model, outcome.data,
                            device).acc
              for name, views in TEST_VIEWS.items()}
    run = result_from_record(outcome.record)
    return {
        "run_id": folder.run_id,
        "config": config.to_dict(),
        **tested,
        **{metric: run.at_best_epoch(metric) for metric in AT_BEST_EPOCH},
        BEST_EPOCH: run.best_epoch,
        RUN_SECONDS: run.seconds,
        "process_s": process_s,
        "epoch_s": run.curve(EPOCH_SECONDS)[1],
        "train_images_per_s": statistics.median(run.curve(TRAIN_IMAGES_PER_SECOND)[1]),
    }


def main(argv: Sequence[str]) -> int:
    parser = settings_parser("python -m benchmarks.run", "[--run_id=ID] [--result=FILE]",
                             __doc__.split("\n\n")[0])
    parser.add_argument("--run_id", default=None, help=f"the run's id (default: {RUN_ID_VARIABLE})")
    parser.add_argument("--result", default=None, help=f"the results' JSON file (default: the run's {RESULT_FILE})")
    args = parser.parse_args(list(argv))
    run_id = check_run_id(args.run_id) if args.run_id else requested_run_id()
    if run_id is None:
        raise UserError(f"--run_id: needed (or {RUN_ID_VARIABLE})")
    set_cpu_threads()  # as `train` does: every core, or OMP_NUM_THREADS (the launcher's share)
    config = settings_from(args)
    folder = RunFolder.of(config.output_dir, run_id)
    atomic_write_json(Path(args.result) if args.result else folder.path / RESULT_FILE, run_one(config, folder))
    return 0


if __name__ == "__main__":
    start_logging()
    sys.exit(run_script(main))
