"""A whole sweep through `cifar-resnet sweep`, timed from outside, its runs' results in one JSON file.

    python -m benchmarks.sweep_wall --out=FILE --output-dir=DIR -- SWEEP_YAML [cifar-resnet sweep options]

The sweep runs offline (`--offline` is added) in DIR, from a fresh folder; the JSON holds the command, its exit
status, its wall seconds (process start to exit: imports, trainers, runs, the final table), and each run's
settings, test accuracy and own seconds, read from its run record.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cifar_resnet.files import atomic_write_json
from cifar_resnet.records import TEST_ACC, results_from_folder


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_wall", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path, help="the sweep's folder (emptied first)")
    parser.add_argument("sweep", nargs=argparse.REMAINDER, help="the sweep file and `cifar-resnet sweep` options")
    args = parser.parse_args()
    sweep_args = [arg for arg in args.sweep if arg != "--"]
    shutil.rmtree(args.output_dir, ignore_errors=True)
    command = [sys.executable, "-m", "cifar_resnet", "sweep", *sweep_args, "--offline",
               f"--output-dir={args.output_dir}"]
    started = time.perf_counter()
    status = subprocess.run(command).returncode
    wall_s = time.perf_counter() - started
    runs = [{"run_id": r.run_id, "status": r.status, "optimizer": r.config.get("optimizer"),
             "learning_rate": r.config.get("learning_rate"), "test_acc": r.summary.get(TEST_ACC),
             "run_seconds": r.seconds} for r in results_from_folder(args.output_dir)]
    atomic_write_json(args.out, {"command": command, "exit_status": status, "wall_s": wall_s, "runs": runs})
    print(f"sweep: exit {status}, {wall_s:.1f} s wall, {len(runs)} runs", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
