"""Whole runs in child processes, each `cifar-resnet bench run` (no W&B), several at a time: what the benchmark's
concurrent runs, the six-cell grid, the pack benchmark's processes and the recipe experiments share."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import Config, argument_parser
from ..process import child_environment, run_logged
from ..run_contract import run_folder

SECONDS_PER_HOUR = 3600


def print_settings_help(prog: str) -> None:
    argument_parser(prog, "Settings (any `cifar-resnet train` setting) of the runs:").print_help()


def settings_argv(config: Config) -> list[str]:
    return [f"--{name}={value}" for name, value in config.to_dict().items()]


def spawn_runs(jobs: Sequence[tuple[str, Config]], workers: int, folder: Path) -> tuple[list[dict[str, Any]], float]:
    """Run each (run id, config) as `python -m cifar_resnet.bench run` in its own process, `workers` at a time.

    Returns each run's result in job order (`process_exit_s`: from its start to its exit, as seen from here),
    and the wall seconds of the whole batch. A failed run's result says so and names its log.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[str, Config]) -> dict[str, Any]:
        run_id, config = job
        result_path, log_path = folder / f"{run_id}.json", folder / f"{run_id}.log"
        result_path.unlink(missing_ok=True)
        run_dir = run_folder(config.output_dir, run_id).resolve()
        if run_dir.is_relative_to(folder.resolve()):  # our own earlier run: start afresh rather than resume it
            shutil.rmtree(run_dir, ignore_errors=True)
        argv = [sys.executable, "-m", "cifar_resnet.bench", "run", f"--run_id={run_id}", f"--result={result_path}",
                *settings_argv(config)]
        started = time.perf_counter()
        code = run_logged(argv, child_environment(workers), log_path)
        if code != 0 or not result_path.exists():
            return {"run_id": run_id, "status": "failed", "exit_code": code, "log": str(log_path)}
        return {**json.loads(result_path.read_text()), "process_exit_s": time.perf_counter() - started}

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, jobs))
    return results, time.perf_counter() - started
