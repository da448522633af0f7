"""`cifar-resnet sweep SWEEP_YAML`: a whole sweep on the machine at hand.

Online (W&B credentials, no `--offline`): the sweep is created on W&B and one `wandb agent --forward-signals` runs
per worker; W&B's controller proposes the runs. Offline: the proposer of W&B's own controller (the `sweeps` package)
proposes them here, and each run starts as `wandb agent` would start it (the sweep's `command`, expanded by wandb's
macro code, in a fresh process), with W&B offline. Finished runs' records go back to the proposer, so `bayes` learns
and `early_terminate` can stop runs. The sweep's state lives in `OUTPUT_DIR/sweep.json`: the same command run again
continues the sweep, resumes interrupted runs and skips finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import yaml

from .config import Config
from .credentials import DEFAULT_PROJECT, choose_mode
from .errors import ConfigError, UserError
from .files import atomic_write_json
from .gpus import AUTO, parse_runs_per_gpu, resolve_runs_per_gpu
from .process import (
    SUPERVISOR_STOP_SIGNALS,
    Launch,
    child_environment,
    reject_unknown_arguments,
    run_staggered,
    start_process,
    stop_on_signals,
    stop_processes,
)
from .records import (
    SELECTION_METRIC,
    RunRecord,
    RunResult,
    read_record,
    result_from_record,
)
from .table import markdown_table
from .wandb_sweep import DEFAULT_STAGGER_SECONDS

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
RUN_LOG = "run.log"  # a run's stdout and stderr, in its run folder
PARAM_FILE = "sweep-params.yaml"  # what WANDB_SWEEP_PARAM_PATH names
ARGS_JSON_FILE = "sweep-args.json"  # for a command that uses ${args_json_file}
DEFAULT_OUTPUT_ROOT = Path("sweeps")
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30.0  # a run saves its resume checkpoint on SIGTERM; after this it is killed
FAILED_LOG_LINES = 15
MAX_INITIAL_FAILURES = 5  # `wandb agent`'s: no new runs once this many failed and no more finished
GRID_SIZE_LIMIT = 100_000
# What W&B's grid search accepts: finite sets of values.
GRID_TYPES = ("param_single_value", "param_categorical", "param_int_uniform", "param_quniform")
# Distributions whose `min` and `max` are values of the setting itself (not logarithms or moments).
BOUNDED_IN_VALUE_SPACE = ("param_uniform", "param_int_uniform", "param_quniform", "param_loguniform_v2",
                          "param_inv_loguniform_v2", "param_qloguniform_v2")
# Local run states: pending (proposed, not started), running, finished, failed, stopped (by early_terminate),
# preempted (stopped by a signal; the next invocation resumes it under the same run id).
DONE = ("finished", "stopped")
PROPOSER_STATE = {"pending": "pending", "running": "running", "finished": "finished", "failed": "failed",
                "stopped": "killed", "preempted": "preempted"}


def sweep_proposer() -> ModuleType:
    """W&B's `sweeps` package, the proposer of its sweep controller (grid, random, bayes, hyperband): its
    pydantic-v1-style classes warn on import, which is not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
        import sweeps.params  # noqa: F401  (HyperParameter, used to check parameters)
    return sweeps


# --- the sweep file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    path: Path
    config: dict[str, Any]  # the sweep as W&B would get it, with --set values fixed
    grid_size: int | None  # runs in the grid; None for random and bayes


def load_sweep(path: Path, overrides: Sequence[str]) -> SweepPlan:
    """Read, override and check a sweep file; every problem is one UserError line naming the file."""
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read the sweep file ({error.strerror})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: not valid YAML{line} ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a sweep: expected a YAML mapping with method, metric and parameters")
    config = apply_overrides(config, overrides)
    try:
        violations = sweep_proposer().schema_violations_from_proposed_config(config)
    except ValueError as error:  # a parameter the schema code cannot even read
        violations = [str(error)]
    if violations:
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        raise UserError(f"{path}: not a valid W&B sweep: {violations[0]}{more}")
    if "output_dir" in config["parameters"]:
        raise UserError(f"{path}: parameter output_dir: a local sweep sets it; use --output-dir instead")
    for needs_metric in ("early_terminate" in config and "early_terminate", config["method"] == "bayes" and "bayes"):
        if needs_metric and "metric" not in config:
            raise UserError(f"{path}: {needs_metric} needs a metric, e.g. metric: {{name: val/acc, goal: maximize}}")
    check_parameters(path, config["parameters"])
    grid_size = count_grid(path, config) if config["method"] == "grid" else None
    if "program" not in config and "${program}" in (config.get("command") or ["${program}"]):
        raise UserError(f"{path}: no program, and the command runs ${{program}}; add program: cifar_resnet.train")
    return SweepPlan(path, config, grid_size)


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`--set name=value`: fix a setting for the whole sweep, typed as its Config field."""
    if not overrides:
        return config
    parameters = dict(config.get("parameters") or {})
    for item in overrides:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise UserError(f"--set {item!r}: expected name=value, e.g. --set epochs=2")
        try:
            typed = getattr(Config.from_mapping({name: value}), name)
        except ConfigError as error:
            raise UserError(f"--set {item}: {error}") from None
        parameters[name] = {"value": typed}
    return {**config, "parameters": parameters}


def check_parameters(path: Path, parameters: Mapping[str, Any]) -> None:
    """Every parameter must be a Config setting, and every value it can take must be allowed."""
    proposer = sweep_proposer()
    constants = {name: spec["value"] for name, spec in parameters.items() if "value" in spec}
    try:
        base = Config.from_mapping(constants)
        for name, spec in parameters.items():
            candidates = spec.get("values", [])
            if proposer.params.HyperParameter(name, spec).type in BOUNDED_IN_VALUE_SPACE:
                candidates = [spec["min"], spec["max"]]
            for value in candidates:
                Config.from_mapping({name: value}, base=base)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def count_grid(path: Path, config: Mapping[str, Any]) -> int:
    """The number of runs in a grid, from the proposer's own proposals."""
    proposer = sweep_proposer()
    for name, spec in config["parameters"].items():
        if proposer.params.HyperParameter(name, spec).type not in GRID_TYPES:
            raise UserError(f"{path}: parameter {name}: a grid needs `values` (or an int_uniform or q_uniform "
                            f"range), not a continuous distribution: the grid would never end")
    proposals = proposer.next_runs(config, [], n=GRID_SIZE_LIMIT)
    return sum(proposal is not None for proposal in proposals)


# --- the sweep's state ------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    run_id: str
    params: dict[str, Any]  # the proposer's proposal: setting -> value
    state: str = "pending"
    exit_code: int | None = None


@dataclass
class SweepState:
    sweep_id: str
    sweep: dict[str, Any]
    runs: list[LocalRun] = field(default_factory=list)

    def save(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / STATE_FILE, dataclasses.asdict(self))

    @classmethod
    def open(cls, out_dir: Path, sweep: dict[str, Any]) -> SweepState:
        """The sweep in `out_dir`, or a new one; a folder that holds another sweep is an error."""
        from .wandb_sweep import new_id

        path = out_dir / STATE_FILE
        if not path.exists():
            return cls(new_id(), sweep)
        saved = json.loads(path.read_text())
        if saved["sweep"] != json.loads(json.dumps(sweep)):
            raise UserError(f"{out_dir}: holds another sweep (its {STATE_FILE} has other settings); "
                            "give another --output-dir or remove that folder")
        return cls(saved["sweep_id"], saved["sweep"], [LocalRun(**run) for run in saved["runs"]])


def proposer_run(run: LocalRun, record: RunRecord | None) -> Any:
    """A run as W&B's proposer sees it: config, state, per-epoch history and summary."""
    return sweep_proposer().SweepRun(
        name=run.run_id, state=PROPOSER_STATE[run.state], config={k: {"value": v} for k, v in run.params.items()},
        history=record.history if record else [], summary_metrics=record.summary if record else {},
    )


def runs_to_stop(sweep: Mapping[str, Any], runs: Sequence[LocalRun], records: Mapping[str, RunRecord | None]
                 ) -> list[str]:
    """The running runs that the sweep's `early_terminate` (hyperband) stops, judged on their histories so far."""
    chosen = sweep_proposer().stop_runs(sweep, [proposer_run(run, records.get(run.run_id)) for run in runs])
    return [run.name for run in chosen]


def run_params(run: LocalRun, out_dir: Path) -> dict[str, Any]:
    """The settings a run gets: the proposer's proposal, and the sweep folder as its output_dir."""
    return {**run.params, "output_dir": str(out_dir.resolve())}


# --- processes --------------------------------------------------------------------------------------------------


def exit_text(run: LocalRun) -> str:
    return "could not start" if run.exit_code is None else f"exit {run.exit_code}"


def log_tail(path: Path, lines: int = FAILED_LOG_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the terminal view ------------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    run: LocalRun
    epoch: int
    epochs: int
    best_val_acc: float | None
    seconds: float | None


def progress_of(run: LocalRun, record: RunRecord | None, base: Config) -> RunProgress:
    epochs = int(run.params.get("epochs", base.epochs))
    if record is None:
        return RunProgress(run, 0, epochs, None, None)
    scores = [entry[SELECTION_METRIC] for entry in record.history]
    return RunProgress(run, len(record.history), epochs, max(scores) if scores else None,
                    record.updated_at - record.started_at)


class LogView:
    """Plain log lines, for logs and pipes."""

    def __init__(self, shown: Sequence[str]) -> None:
        self.shown = shown

    def __enter__(self) -> LogView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def started(self, run: LocalRun, gpu: str | None) -> None:
        where = f" on GPU {gpu}" if gpu is not None else ""
        settings = " ".join(f"{name}={run.params.get(name)}" for name in self.shown)
        log.info("run %s started%s: %s", run.run_id, where, settings)

    def ended(self, progress: RunProgress, log_path: Path) -> None:
        run = progress.run
        if run.state == "failed":
            log.error("run %s failed (%s); its log: %s", run.run_id, exit_text(run), log_path)
        else:
            best = "–" if progress.best_val_acc is None else f"{100 * progress.best_val_acc:.2f}%"
            log.info("run %s %s after %d/%d epochs: best val acc %s", run.run_id, run.state, progress.epoch,
                     progress.epochs, best)

    def refresh(self, progress: Sequence[RunProgress], total_runs: int | None) -> None:
        return None


class LiveView(LogView):
    """A live table of runs and an overall bar, redrawn in place on a terminal."""

    def __enter__(self) -> LiveView:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("epochs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                       TimeElapsedColumn(), TextColumn("remaining"), TimeRemainingColumn())
        self.task = self.bar.add_task("", total=None)
        self.live = Live(console=Console(stderr=True), refresh_per_second=2)
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def started(self, run: LocalRun, gpu: str | None) -> None:
        return None

    def ended(self, progress: RunProgress, log_path: Path) -> None:
        return None

    def refresh(self, progress: Sequence[RunProgress], total_runs: int | None) -> None:
        from rich.console import Group
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ("run", "state", *self.shown, "epoch", "best val acc", "time"):
            table.add_column(column)
        for item in progress:
            best = "" if item.best_val_acc is None else f"{100 * item.best_val_acc:.2f}%"
            seconds = "" if item.seconds is None else f"{item.seconds:.0f}s"
            table.add_row(item.run.run_id, item.run.state, *(str(item.run.params.get(name)) for name in self.shown),
                          f"{item.epoch}/{item.epochs}", best, seconds)
        done = sum(item.run.state in (*DONE, "failed") for item in progress)
        expected = max(total_runs or 0, len(progress))
        epochs_each = max((item.epochs for item in progress), default=0)
        self.bar.update(self.task, completed=sum(item.epoch for item in progress),
                        total=expected * epochs_each if total_runs else None,
                        description=f"runs {done}/{total_runs if total_runs else '?'}")
        self.live.update(Group(table, self.bar))


# --- offline: W&B's proposer on this machine ----------------------------------------------------------------


@dataclass
class LocalSweepResult:
    exit_code: int
    state: SweepState
    out_dir: Path


@dataclass
class Worker:
    """A run in progress: its process, the GPU it holds and its log file."""

    process: subprocess.Popen
    gpu: str | None
    log_file: IO[bytes]


class LocalSweep:
    """W&B's proposer on this machine: proposes runs, starts them as the agent would, and feeds back results."""

    def __init__(self, plan: SweepPlan, out_dir: Path, gpus: Sequence[str | None], count: int | None,
                 project: str | None, view: LogView) -> None:
        self.plan, self.out_dir, self.count, self.project, self.view = plan, out_dir, count, project, view
        out_dir.mkdir(parents=True, exist_ok=True)
        self.state = SweepState.open(out_dir, plan.config)
        self.base = Config.from_mapping({name: spec["value"] for name, spec in plan.config["parameters"].items()
                                         if "value" in spec})
        self.queue = [run for run in self.state.runs if run.state not in DONE]  # interrupted and failed: again
        for run in self.queue:
            run.state = "pending"
        self.total = min(filter(None, (plan.grid_size, count)), default=None)
        self.free_gpus = list(gpus)
        self.workers = len(gpus)
        self.active: dict[str, Worker] = {}
        self.stopping: set[str] = set()  # runs that early_terminate stopped
        self.done_records: dict[str, RunRecord | None] = {}  # records of ended runs do not change: read them once
        self.ended_here: dict[str, int] = {}  # runs ended in this invocation, by state
        self.gave_up = False  # too many runs failed

    def record_of(self, run: LocalRun) -> RunRecord | None:
        if run.run_id in self.done_records:
            return self.done_records[run.run_id]
        record = read_record(self.out_dir / run.run_id)
        if run.state in (*DONE, "failed"):
            self.done_records[run.run_id] = record
        return record

    def propose(self) -> LocalRun | None:
        """The next run: an interrupted or failed one first, then the proposer's next proposal."""
        if self.queue:
            return self.queue.pop(0)
        if self.count is not None and len(self.state.runs) >= self.count:
            return None
        failed, finished = self.ended_here.get("failed", 0), self.ended_here.get("finished", 0)
        if failed >= max(finished, MAX_INITIAL_FAILURES):
            if not self.gave_up:
                log.error("%d runs failed and %d finished: no new runs (as `wandb agent` does)", failed, finished)
            self.gave_up = True
            return None
        proposer = sweep_proposer()
        proposal = proposer.next_run(self.plan.config, [proposer_run(run, self.record_of(run)) for run in self.state.runs])
        if proposal is None:  # the grid is complete
            return None
        from .wandb_sweep import new_id

        # Through JSON, as from W&B's server: the proposer's numpy numbers become plain ones.
        params = json.loads(json.dumps({name: spec["value"] for name, spec in proposal.config.items()},
                                       default=lambda number: number.item()))
        run = LocalRun(new_id(), params)
        self.state.runs.append(run)
        return run

    def start(self, run: LocalRun, gpu: str | None) -> None:
        from .wandb_sweep import agent_command, write_param_file

        run_dir = self.out_dir / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        params = run_params(run, self.out_dir)
        write_param_file(run_dir / PARAM_FILE, params)
        command = agent_command(self.plan.config.get("command"), self.plan.config.get("program"), params,
                                run_dir / ARGS_JSON_FILE)
        env = self.environment(run, gpu)
        log_file = open(run_dir / RUN_LOG, "ab")  # appended: a resumed run keeps its earlier attempts' lines
        try:
            process = start_process(command, env, log_file)
        except OSError as error:  # the sweep's command cannot start: this run fails, the sweep goes on
            log_file.write(f"cannot start {' '.join(command)}: {error}\n".encode())
            log_file.close()
            self.free_gpus.append(gpu)
            self.ended(run, "failed", None)
            return
        self.active[run.run_id] = Worker(process, gpu, log_file)
        run.state, run.exit_code = "running", None
        self.state.save(self.out_dir)
        self.view.started(run, gpu)

    def environment(self, run: LocalRun, gpu: str | None) -> dict[str, str]:
        """The environment `wandb agent` gives a run, offline.

        Not WANDB_SWEEP_ID: the local sweep id is unknown to the W&B server, and `wandb sync` refuses runs of an
        unknown sweep ("sweep ... not found", wandb/wandb#8115). The runs are grouped by sweep instead.
        """
        name = self.plan.config.get("name") or self.plan.path.stem
        # `${interpreter}` is `python` from PATH, as under `wandb agent`: the child environment puts this one's
        # first, so that the runs get the interpreter cifar_resnet is installed in even when it is not activated.
        env = child_environment(
            self.workers,
            WANDB_MODE="offline",
            WANDB_RUN_ID=run.run_id,
            WANDB_SWEEP_PARAM_PATH=str((self.out_dir / run.run_id / PARAM_FILE).resolve()),
            WANDB_RUN_GROUP=f"sweep-{name}-{self.state.sweep_id}",
        )
        env.pop("WANDB_SWEEP_ID", None)  # one left in this shell by an agent
        env.setdefault("WANDB_DIR", str(self.out_dir.resolve()))  # the sweep's offline runs together, to sync
        if self.project:
            env["WANDB_PROJECT"] = self.project
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def ended(self, run: LocalRun, state: str, exit_code: int | None) -> None:
        run.state, run.exit_code = state, exit_code
        self.ended_here[state] = self.ended_here.get(state, 0) + 1
        self.state.save(self.out_dir)
        self.view.ended(progress_of(run, self.record_of(run), self.base), self.out_dir / run.run_id / RUN_LOG)

    def reap(self) -> None:
        """Record the runs whose process has ended, and free their GPUs."""
        for run in [run for run in self.state.runs if run.run_id in self.active]:
            worker = self.active[run.run_id]
            if worker.process.poll() is None:
                continue
            worker.log_file.close()
            del self.active[run.run_id]
            self.free_gpus.append(worker.gpu)
            exit_code = worker.process.returncode
            if run.run_id in self.stopping:
                self.ended(run, "stopped", exit_code)
            elif exit_code == 0:
                self.ended(run, "finished", exit_code)
            elif exit_code > 128:  # stopped by a signal after saving its state (train.py's convention)
                self.ended(run, "preempted", exit_code)
                self.queue.append(run)
            else:
                self.ended(run, "failed", exit_code)

    def early_terminate(self) -> None:
        if "early_terminate" not in self.plan.config:
            return
        records = {run.run_id: self.record_of(run) for run in self.state.runs}
        for run_id in runs_to_stop(self.plan.config, self.state.runs, records):
            if run_id in self.active and run_id not in self.stopping:
                log.info("run %s: stopped by early_terminate", run_id)
                self.stopping.add(run_id)
                self.active[run_id].process.terminate()

    def interrupt(self, signum: int) -> None:
        """Stop every run in progress (each saves its state); those that did not finish resume next time."""
        stop_processes([worker.process for worker in self.active.values()], STOP_GRACE_SECONDS)
        for run in [run for run in self.state.runs if run.run_id in self.active]:
            worker = self.active.pop(run.run_id)
            worker.log_file.close()
            exit_code = worker.process.returncode
            self.ended(run, "finished" if exit_code == 0 else "preempted", exit_code)
        log.warning("stopped by signal %d; run the same command again to continue the sweep", signum)

    def run(self) -> LocalSweepResult:
        with stop_on_signals(SUPERVISOR_STOP_SIGNALS) as received, self.view:
            while not received:
                self.reap()
                self.early_terminate()
                while self.free_gpus and not received and (run := self.propose()) is not None:
                    self.start(run, self.free_gpus.pop(0))
                self.view.refresh([progress_of(run, self.record_of(run), self.base) for run in self.state.runs],
                                  self.total)
                if not self.active:
                    break
                time.sleep(POLL_SECONDS)
            if received:
                self.interrupt(received[0])
                return LocalSweepResult(128 + received[0], self.state, self.out_dir)
        failed = any(run.state == "failed" for run in self.state.runs)
        return LocalSweepResult(1 if failed else 0, self.state, self.out_dir)


# --- online: W&B's controller and agents ------------------------------------------------------------------------


def run_online_sweep(plan: SweepPlan, gpus: Sequence[str | None], count: int | None, project: str) -> int:
    """Create the sweep on W&B, then run one `wandb agent` per worker, pinned and started a few seconds apart
    (`cifar-resnet agent`'s launcher, which forwards Ctrl-C and SIGTERM to the agents)."""
    from .wandb_sweep import agent_argv, create_sweep

    config = {**plan.config, "run_cap": count} if count is not None else plan.config
    sweep_id = create_sweep(config, project)
    argv = agent_argv(sweep_id, project)
    status = run_staggered([Launch(argv, gpu) for gpu in gpus], DEFAULT_STAGGER_SECONDS, "agent")
    if status == 0:
        log.info("sweep %s done; see it with: cifar-resnet report <entity>/%s/%s", sweep_id, project, sweep_id)
    return status


# --- the command ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", type=Path, metavar="SWEEP_YAML", help="a W&B sweep file, e.g. sweep.yaml")
    parser.add_argument("--workers", type=int, default=None, help="runs at a time (default: 1, or one per --gpus)")
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
                        f"{DEFAULT_OUTPUT_ROOT}/<sweep name>); offline only")


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
    if per_gpu is None:
        per_gpu = workers // len(indices) if workers is not None else resolve_runs_per_gpu(None, indices)
    return [index for index in indices for _ in range(per_gpu)]


def sweep_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("sweep", rest)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count: must be >= 1, got {args.count}")
    gpus = parse_gpus(args.gpus, args.workers, args.runs_per_gpu)
    plan = load_sweep(args.sweep_file, args.overrides)
    project = args.project or plan.config.get("project") or os.environ.get("WANDB_PROJECT")
    if not args.offline and choose_mode() == "online":
        return run_online_sweep(plan, gpus, args.count, project or DEFAULT_PROJECT)
    folder_name = re.sub(r"[^\w.-]+", "-", str(plan.config.get("name") or plan.path.stem))
    out_dir = args.output_dir or DEFAULT_OUTPUT_ROOT / folder_name
    shown = [name for name, spec in plan.config["parameters"].items() if "value" not in spec]
    view = LiveView(shown) if sys.stderr.isatty() else LogView(shown)
    result = LocalSweep(plan, out_dir, gpus, args.count, project, view).run()
    print_results(result)
    return result.exit_code


def print_results(result: LocalSweepResult) -> None:
    """The results table of the sweep's runs, then the end of each failed run's log."""
    rows = []
    for run in result.state.runs:
        record = read_record(result.out_dir / run.run_id)
        # A run that failed before writing its record still gets a row, with the settings it was given.
        row = result_from_record(record) if record else RunResult(
            run.run_id, run.state, Config.from_mapping(run_params(run, result.out_dir)).to_dict(), [], {}, None)
        row.status = run.state  # the sweep's view: a run that early_terminate stopped is "stopped", not preempted
        rows.append(row)
    if rows:
        print(markdown_table(rows))
    for run in result.state.runs:
        if run.state == "failed":
            path = result.out_dir / run.run_id / RUN_LOG
            print(f"run {run.run_id} failed ({exit_text(run)}); last lines of {path}:\n{log_tail(path)}\n")
    print(f"sweep folder: {result.out_dir}  (report: cifar-resnet report {result.out_dir})")
