"""`cifar-resnet sweep SWEEP_YAML`: a whole sweep on the machine at hand.

Online (W&B credentials, no `--offline`): the sweep is created on W&B and one `wandb agent --forward-signals` runs
per worker; W&B's controller proposes the runs. Offline: the proposer of W&B's own controller (the `sweeps` package)
proposes them here, and each run starts as `wandb agent` would start it (the sweep's `command`, expanded by wandb's
macro code, in a fresh process), with W&B offline. Finished runs' records go back to the proposer, so `bayes` learns
and `early_terminate` can stop runs. The sweep's state lives in `OUTPUT_DIR/sweep.json` (see `sweep/state.py`): the
same command run again continues the sweep, resumes interrupted runs and skips finished ones, and several such
processes, on one host or many sharing the folder, join one sweep and run each of its runs once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..credentials import DEFAULT_PROJECT, choose_mode
from ..errors import UserError, reject_unknown_arguments
from ..gpus import AUTO, check_gpus_exist, parse_runs_per_gpu, resolve_runs_per_gpu
from ..packing.pool import OFF, STREAMS, TrainerPool, add_pack_arguments, pack_mode
from ..records import RunFolder, RunResult, result_from_record
from ..run_contract import SIGNAL_EXIT_BASE
from ..staggered import Launch, first_failure, run_staggered_statuses
from ..table import markdown_table
from ..wandb_sweep import DEFAULT_STAGGER_SECONDS, agent_argv, create_sweep
from .local import LocalSweep, LocalSweepResult, record_if_readable, run_params
from .plan import (
    DEFAULT_OUTPUT_ROOT,
    SweepPlan,
    default_output_dir,
    load_sweep,
    sweep_proposer,
    warn_unless_our_entry_point,
)
from .state import LEASE_SECONDS
from .view import LiveView, LogView, exit_text

log = logging.getLogger(__name__)

FAILED_LOG_LINES = 15


# --- online: W&B's controller and agents ------------------------------------------------------------------------


def run_online_sweep(plan: SweepPlan, gpus: Sequence[str | None], count: int | None, project: str, pack: str) -> int:
    """Create the sweep on W&B, then run one `wandb agent` per worker, pinned and started a few seconds apart
    (`cifar-resnet agent`'s launcher, which forwards Ctrl-C and SIGTERM to the agents); unless `pack` is off, the
    runs of each GPU hand their training to its trainer, as `cifar-resnet agent`'s do."""
    config = {**plan.config, "run_cap": count} if count is not None else plan.config
    sweep_id = create_sweep(config, project)
    argv = agent_argv(sweep_id, project)
    with TrainerPool(gpus, mode=pack) if pack != OFF else contextlib.nullcontext() as trainers:
        launches = [Launch(argv, gpu, trainers.environment(gpu) if trainers is not None else {}) for gpu in gpus]
        statuses = run_staggered_statuses(launches, DEFAULT_STAGGER_SECONDS, "agent",
                                          tend=trainers.revive if trainers is not None else None)
    status = first_failure(statuses, "agent")
    if status == 0:
        log.info("sweep %s done; see it with: cifar-resnet report <entity>/%s/%s", sweep_id, project, sweep_id)
    return status


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", type=Path, metavar="SWEEP_YAML", help="a W&B sweep file, e.g. sweep.yaml")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at a time (default: 1; with --gpus, --runs-per-gpu x the GPUs)")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU indices, e.g. 0,1: workers pinned to each (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--runs-per-gpu", default=AUTO, metavar="N|auto",
                        help="workers sharing each GPU of --gpus; auto: from the table keyed by GPU memory in "
                        "cifar_resnet/gpus.py, or --workers / GPUs when --workers is given (default: auto)")
    parser.add_argument("--count", type=int, default=None,
                        help="stop when the sweep has this many runs (counting earlier invocations); needed to end "
                        "random and bayes sweeps")
    parser.add_argument("--project", default=None, help="W&B project (default: the sweep's, WANDB_PROJECT or "
                        "cifar-resnet)")
    parser.add_argument("--offline", action="store_true",
                        help="run the sweep here with W&B's sweep proposer, even with W&B credentials")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="fix a setting for the whole sweep, e.g. --set epochs=2 (repeatable)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"the sweep's folder: its state, and one folder per run (default: "
                        f"{DEFAULT_OUTPUT_ROOT}/<sweep name>-<digest of its settings>); offline only. Other sweep "
                        "processes, on this host or others (shared filesystem), join the sweep by giving the same "
                        "folder")
    add_pack_arguments(parser, "streams when a GPU has more than one run, else off; online too, the agents' runs "
                       "handing their training to the trainers; on a CPU a trainer's runs take turns in one process")
    parser.add_argument("--lease-seconds", type=float, default=LEASE_SECONDS,
                        help=f"offline: a run of this process that goes this long without a heartbeat (its host "
                        f"died) may be taken over by another process (default {LEASE_SECONDS:.0f})")


def parse_gpus(gpus: str | None, workers: int | None, runs_per_gpu: str | None = None) -> list[str | None]:
    """One entry per worker: the GPU it is pinned to, or None (unpinned)."""
    per_gpu = parse_runs_per_gpu(runs_per_gpu, "--runs-per-gpu")
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if gpus is None:
        return [None] * (workers or 1)
    indices = [item.strip() for item in gpus.split(",")]
    if not all(re.fullmatch(r"\d+", index) for index in indices):
        raise UserError(f"--gpus: expected comma-separated GPU indices such as 0,1, got {gpus!r}")
    if workers is not None and (workers % len(indices) or (per_gpu and workers != per_gpu * len(indices))):
        raise UserError(f"--workers: {workers} does not match the {len(indices)} GPUs of --gpus {gpus}"
                        f"{f' x {per_gpu} runs per GPU' if per_gpu else ''}")
    check_gpus_exist(indices, "--gpus", "name GPUs it has, or leave --gpus out to train on the CPU")
    if per_gpu is None:
        per_gpu = workers // len(indices) if workers is not None else resolve_runs_per_gpu(None, indices)
    return [index for index in indices for _ in range(per_gpu)]


def shares_a_gpu(gpus: Sequence[str | None]) -> bool:
    """Whether some GPU has more than one worker: then its runs are packed (on streams) by default."""
    pinned = [gpu for gpu in gpus if gpu is not None]
    return len(pinned) > len(set(pinned))


def sweep_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("sweep", rest)
    sweep_proposer()  # first: without the sweep extra (a worker's install), say so before anything else
    if args.count is not None and args.count < 1:
        raise UserError(f"--count: must be >= 1, got {args.count}")
    if not args.lease_seconds > 0:
        raise UserError(f"--lease-seconds: must be > 0, got {args.lease_seconds}")
    asked_pack = pack_mode(args.pack)
    gpus = parse_gpus(args.gpus, args.workers, args.runs_per_gpu)
    pack = asked_pack or (STREAMS if shares_a_gpu(gpus) else OFF)
    plan = load_sweep(args.sweep_file, args.overrides)
    warn_unless_our_entry_point(plan)
    if plan.grid_size is None and args.count is None:
        log.warning("%s: method %s without --count proposes runs until it is stopped (Ctrl-C; the same command "
                    "resumes it); --count N ends it after N runs", plan.path, plan.config["method"])
    project = args.project or plan.config.get("project") or os.environ.get("WANDB_PROJECT")
    mode = choose_mode()
    if not args.offline and mode == "online":
        return run_online_sweep(plan, gpus, args.count, project or DEFAULT_PROJECT, pack)
    out_dir = args.output_dir or default_output_dir(plan)
    shown = [name for name, spec in plan.config["parameters"].items() if "value" not in spec]
    view = LiveView(shown) if sys.stderr.isatty() else LogView(shown)
    local_sweep = LocalSweep(plan, out_dir, gpus, args.count, project, view, args.lease_seconds, pack)  # may refuse
    log.info("%s: running the sweep offline in %s (W&B's sweep proposer on this machine); upload the runs later "
             "with `wandb sync %s`", offline_reason(args.offline), out_dir, offline_runs_glob(out_dir))
    result = local_sweep.run()
    print_results(result)
    return result.exit_code


def offline_reason(asked: bool) -> str:
    if asked:
        return "--offline"
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']}"
    return "no W&B credentials (`wandb login` or WANDB_API_KEY)"


def offline_runs_glob(out_dir: Path) -> str:
    """Where the runs' offline W&B folders go: WANDB_DIR when set, else the sweep's folder (see `environment`)."""
    return str(Path(os.environ.get("WANDB_DIR") or out_dir) / "wandb" / "offline-run-*")


def print_results(result: LocalSweepResult) -> None:
    """The results table of the sweep's runs, then the end of each failed run's log; or, when a user mistake
    stopped the sweep, that one line."""
    if result.user_mistake is not None:
        log.error("%s (the sweep stopped: every run would fail the same way; fix it, then run the same command "
                  "again)", result.user_mistake)
        return
    rows = []
    for run in result.state.runs:
        record = record_if_readable(RunFolder.of(result.out_dir, run.run_id))
        # A run that failed before writing its record (or with one it cannot read) still gets a row, with the
        # settings it was given.
        row = result_from_record(record) if record else RunResult(
            run.run_id, run.state, Config.from_mapping(run_params(run, result.out_dir)).to_dict(), [], {}, None)
        row.status = run.state  # the sweep's view: a run that early_terminate stopped is "stopped", not preempted
        rows.append(row)
    if rows:
        print(markdown_table(rows))
    for run in result.state.runs:
        if run.state == "failed":
            path = RunFolder.of(result.out_dir, run.run_id).log
            print(f"run {run.run_id} failed ({exit_text(run)}); last lines of {path}:\n{log_tail(path)}\n")
    print(f"sweep folder: {result.out_dir}  (report: cifar-resnet report {result.out_dir})")
    if result.exit_code > SIGNAL_EXIT_BASE:
        print("stopped; run the same command to resume")


def log_tail(path: Path, lines: int = FAILED_LOG_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
