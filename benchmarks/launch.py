"""Whole runs in child processes, each `python -m benchmarks.run` (a run without W&B, its best weights tested with
each TTA view), through the package's own launchers:

- `runs_at_once`: every run started at once and waited for (the launcher of `cifar-resnet agent`'s agents), for the
  benchmark's concurrent runs and the sharing benchmark's processes;
- `sweep_runs`: the runs as an offline sweep (`LocalSweep`, what `cifar-resnet sweep` runs), `workers` at a time,
  for the grids. Their settings are given, not proposed: they enter the sweep's state as pending runs, which the
  sweep claims in order before it would ask W&B's proposer for more (it never does: the sweep's count is theirs).

Each puts run RUN_ID's folder, log (`run.log`) and results (`RESULT_FILE`) in `folder/RUN_ID`, starting afresh over
an earlier call's, and returns every run's results in the jobs' order (a run that failed or never started says so,
with its exit status and its log) and the wall seconds of them all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_resnet.children import child_environment, start_process
from cifar_resnet.config import Config
from cifar_resnet.records import RunFolder
from cifar_resnet.staggered import Launch, run_staggered_statuses
from cifar_resnet.sweep.local import LocalSweep
from cifar_resnet.sweep.plan import SweepPlan
from cifar_resnet.sweep.state import STATE_FILE, LocalRun, SweepFolder
from cifar_resnet.sweep.view import LogView
from cifar_resnet.wandb_sweep import new_id

from .run import RESULT_FILE

RUN_MODULE = "benchmarks.run"
SECONDS_PER_HOUR = 3600
# The sweep's command: the run as a module (the checkout's root is on the path: the sweep's child environment puts
# the folder holding cifar_resnet/ there), its settings as `--name=value`, its run id in WANDB_RUN_ID.
SWEEP_COMMAND = ["${env}", "${interpreter}", "-m", "${program}", "${args}"]

Job = tuple[str, Config]  # a run's id and settings


def run_settings(config: Config) -> dict[str, Any]:
    """A run's settings as its command line gives them: every one but its folder, which the launcher sets."""
    return {name: value for name, value in config.to_dict().items() if name != "output_dir"}


def start_afresh(folder: Path, jobs: Sequence[Job]) -> None:
    """Remove what an earlier call left of these runs in `folder` (their folders, the sweep's state), so that each
    trains anew rather than resuming or being refused as finished; nothing else there is touched."""
    for run_id, _ in jobs:
        shutil.rmtree(RunFolder.of(folder, run_id).path, ignore_errors=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)


def result_of(folder: Path, run_id: str, exit_code: int | None) -> dict[str, Any]:
    """What run `run_id` measured (its results file, written last: none is left from an earlier call), or that it
    failed (or never started: exit status None) and where its log is."""
    run = RunFolder.of(folder, run_id)
    path = run.path / RESULT_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"run_id": run_id, "status": "failed", "exit_code": exit_code, "log": str(run.log)}


def runs_at_once(jobs: Sequence[Job], folder: Path) -> tuple[list[dict[str, Any]], float]:
    """Every job's run started at once, each sharing the cores with the others."""
    start_afresh(folder, jobs)
    environment = child_environment(len(jobs))
    launches = []
    for run_id, config in jobs:
        RunFolder.of(folder, run_id).path.mkdir()
        launches.append(Launch([sys.executable, "-m", RUN_MODULE, f"--run_id={run_id}",
                                *(f"--{name}={value}" for name, value in run_settings(config).items()),
                                f"--output_dir={folder}"], None, environment))
    with contextlib.ExitStack() as logs:
        files = iter([logs.enter_context(open(RunFolder.of(folder, run_id).log, "wb")) for run_id, _ in jobs])
        started = time.perf_counter()
        statuses = run_staggered_statuses(launches, 0.0, "run",
                                          start=lambda argv, env: start_process(argv, env, next(files)))
        wall_s = time.perf_counter() - started
    statuses += [None] * (len(jobs) - len(statuses))  # not started: stopped by a signal first
    return [result_of(folder, run_id, status) for (run_id, _), status in zip(jobs, statuses, strict=True)], wall_s


def sweep_runs(jobs: Sequence[Job], workers: int, folder: Path, name: str) -> tuple[list[dict[str, Any]], float]:
    """Every job's run through an offline sweep named `name` in `folder`, `workers` at a time."""
    start_afresh(folder, jobs)
    sweep = {"name": name, "method": "grid", "program": RUN_MODULE, "command": SWEEP_COMMAND, "parameters": {}}
    with SweepFolder(folder, sweep, new_id).transaction() as state:
        state.runs += [LocalRun(run_id, run_settings(config)) for run_id, config in jobs]
    plan = SweepPlan(folder / STATE_FILE, sweep, grid_size=len(jobs))
    shown = ["optimizer", "learning_rate", "seed"]
    started = time.perf_counter()
    ended = LocalSweep(plan, folder, [None] * workers, len(jobs), None, LogView(shown)).run()
    wall_s = time.perf_counter() - started
    exit_codes = {run.run_id: run.exit_code for run in ended.state.runs}
    return [result_of(folder, run_id, exit_codes.get(run_id)) for run_id, _ in jobs], wall_s
