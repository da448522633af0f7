"""`cifar-resnet sweep SWEEP_YAML`: a whole sweep on the machine at hand.

Online (W&B credentials, no `--offline`): the sweep is created on W&B and one `wandb agent --forward-signals` runs
per worker; W&B's controller proposes the runs. Offline: the proposer of W&B's own controller (the `sweeps` package)
proposes them here, and each run starts as `wandb agent` would start it (the sweep's `command`, expanded by wandb's
macro code, in a fresh process), with W&B offline. Finished runs' records go back to the proposer, so `bayes` learns
and `early_terminate` can stop runs. The sweep's state lives in `OUTPUT_DIR/sweep.json` (see `sweep_state`): the
same command run again continues the sweep, resumes interrupted runs and skips finished ones, and several such
processes, on one host or many sharing the folder, join one sweep and run each of its runs once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import re
import socket
import statistics
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
from .errors import ConfigError, UserError, extra_needed
from .gpus import AUTO, parse_runs_per_gpu, resolve_runs_per_gpu
from .names import sweep_folder_name
from .process import (
    SIGNAL_EXIT_BASE,
    SUPERVISOR_STOP_SIGNALS,
    Launch,
    Trainers,
    child_environment,
    logs_to_current_stderr,
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
    read_progress,
    read_record,
    result_from_record,
)
from .sweep_state import (
    CLAIMABLE,
    DONE,
    LEASE_SECONDS,
    LocalRun,
    SweepFolder,
    SweepState,
    renew_interval,
    worker_name,
)
from .table import duration_text, markdown_table
from .wandb_sweep import DEFAULT_STAGGER_SECONDS

log = logging.getLogger(__name__)

RUN_LOG = "run.log"  # a run's stdout and stderr, in its run folder
TRAINER_LOGS = "trainers"  # in the sweep's folder, a folder per host: each trainer's log (`--pack`)
PARAM_FILE = "sweep-params.yaml"  # what WANDB_SWEEP_PARAM_PATH names
ARGS_JSON_FILE = "sweep-args.json"  # for a command that uses ${args_json_file}
DEFAULT_OUTPUT_ROOT = Path("sweeps")
FOLDER_DIGEST_CHARS = 8  # hex digits of the settings' digest in a sweep's default folder name
TRAIN_MODULE = "cifar_resnet.train"  # the training entry point a sweep's command must start
PACKAGE_MODULE, PACKAGE_COMMAND = "cifar_resnet", "cifar-resnet"  # `-m cifar_resnet train`, `cifar-resnet train`
OUR_COMMAND = ("${env}", "${interpreter}", "-m", "${program}", "${args}")  # sweep.yaml's
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30.0  # a run saves its resume checkpoint on SIGTERM; after this it is killed
FAILED_LOG_LINES = 15
MAX_INITIAL_FAILURES = 5  # `wandb agent`'s: no new runs once this many failed and no more finished
USER_MISTAKE_EXIT = 2  # a run's exit status for a user mistake (data not found, download impossible, a bad value)
PROGRESS_LOG_SECONDS = 30.0  # outside a terminal, one progress line per running run this often
RUN_BAR_WIDTH = 20  # characters of each run's bar in the live table
RUN_ID_CHARS = 8  # W&B's run ids: 8 letters and digits
ERROR_LINE_PREFIX = "ERROR: "  # how a run's log marks its one-line error (process.setup_logging's format)
GRID_SIZE_LIMIT = 100_000
# What W&B's grid search accepts: finite sets of values.
GRID_TYPES = ("param_single_value", "param_categorical", "param_int_uniform", "param_quniform")
# Distributions whose `min` and `max` are values of the setting itself (not logarithms or moments).
BOUNDED_IN_VALUE_SPACE = ("param_uniform", "param_int_uniform", "param_quniform", "param_loguniform_v2",
                          "param_inv_loguniform_v2", "param_qloguniform_v2")
NO_RECORD_REASON = "exited 0 without a run record: the sweep's command did not run cifar_resnet.train"
MAX_SWEEP_FILE_BYTES = 1_000_000  # a sweep file has a few kB
# Values, lists and mappings in a sweep file, each alias (*name) counted as what it repeats: a sweep has hundreds.
MAX_SWEEP_YAML_NODES = 100_000
PROPOSER_STATE = {"pending": "pending", "running": "running", "finished": "finished", "failed": "failed",
                "stopped": "killed", "preempted": "preempted"}


def sweep_proposer() -> ModuleType:
    """W&B's `sweeps` package, the proposer of its sweep controller (grid, random, bayes, hyperband): its
    pydantic-v1-style classes warn on import, which is not the user's concern."""
    with warnings.catch_warnings(), extra_needed("sweep", "sweep"):
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


def read_sweep_yaml(path: Path) -> Any:
    """A sweep file's YAML, read in bounded time and memory: at most MAX_SWEEP_FILE_BYTES of UTF-8, holding at most
    MAX_SWEEP_YAML_NODES values once its aliases are expanded. An alias bomb (lists of aliases of lists of aliases)
    is a few lines that expand to billions of values, later, in whatever walks the document; it is refused before.
    Every problem is one UserError line naming the file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SWEEP_FILE_BYTES + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read the sweep file ({error.strerror})") from None
    if len(data) > MAX_SWEEP_FILE_BYTES:
        raise UserError(f"{path}: more than {MAX_SWEEP_FILE_BYTES:,} bytes: not a sweep file")
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start} is {data[error.start]:#04x}): not a sweep "
                        "file") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}, set()) > MAX_SWEEP_YAML_NODES:
            raise UserError(f"{path}: more than {MAX_SWEEP_YAML_NODES:,} values once its aliases (*name) are "
                            "expanded: not a sweep file")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: not valid YAML{line} ({getattr(error, 'problem', None) or error})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply, or an alias (*name) inside its own anchor: not a sweep "
                        "file") from None
    finally:
        loader.dispose()


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The nodes `node` stands for with its aliases expanded, each distinct node counted once (`sizes`); a node
    inside itself (`&a [*a]`) raises RecursionError."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise RecursionError
    open_nodes.add(key)
    children = node.value if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    sizes[key] = 1 + sum(_expanded_nodes(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    return sizes[key]


def load_sweep(path: Path, overrides: Sequence[str]) -> SweepPlan:
    """Read, override and check a sweep file; every problem is one UserError line naming the file."""
    config = read_sweep_yaml(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a sweep: expected a YAML mapping with method, metric and parameters")
    if not isinstance(config.get("parameters", {}), dict):
        raise UserError(f"{path}: parameters: expected a mapping of setting names to {{value: ...}} or "
                        "{values: [...]}, e.g. parameters: {learning_rate: {values: [0.001, 0.0005]}}")
    config = apply_overrides(config, overrides)
    try:
        violations = sweep_proposer().schema_violations_from_proposed_config(config)
    except (ValueError, TypeError, AttributeError) as error:  # a parameter the schema code cannot even read
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


def sweep_name(plan: SweepPlan) -> str:
    """The sweep's `name`, or its file's stem."""
    return str(plan.config.get("name") or plan.path.stem)


def default_output_dir(plan: SweepPlan) -> Path:
    """`sweeps/<name>-<digest>`: the sweep's name and a digest of everything that makes it this sweep (its settings,
    `--set` values included; what `sweep.json` must match), so that the same command finds its own folder again and
    a changed one, such as the trial with `--set dataset=imagefolder`, gets a folder of its own."""
    name = sweep_folder_name(sweep_name(plan))  # one that stays in DEFAULT_OUTPUT_ROOT, or a UserError
    settings = json.dumps(plan.config, sort_keys=True)  # as sweep.json holds it: key order does not matter
    digest = hashlib.sha256(settings.encode()).hexdigest()[:FOLDER_DIGEST_CHARS]
    return DEFAULT_OUTPUT_ROOT / f"{name}-{digest}"


def starts_our_training(argv: Sequence[str]) -> bool:
    """Whether a run command starts this package's training: `... -m cifar_resnet.train`, `... -m cifar_resnet
    train`, or `cifar-resnet train`."""
    for index, word in enumerate(argv):
        after = list(argv[index + 1:index + 3])
        if word == "-m" and (after[:1] == [TRAIN_MODULE] or after == [PACKAGE_MODULE, "train"]):
            return True
        if Path(word).name == PACKAGE_COMMAND and after[:1] == ["train"]:
            return True
    return False


def warn_unless_our_entry_point(plan: SweepPlan) -> None:
    """A sweep whose command would not start our training (W&B's default command runs `${program}` as a file
    path, without `-m`) is allowed, since a wrapper script may start it, but gets one warning line."""
    import tempfile

    from .wandb_sweep import agent_command

    with tempfile.TemporaryDirectory() as scratch:  # where a ${args_json_file} command writes its file
        argv = agent_command(plan.config.get("command"), plan.config.get("program"), {}, Path(scratch) / "args.json")
    if not starts_our_training(argv):
        log.warning("%s: the agent would run `%s`, which is not this package's training; for it write "
                    "program: %s and command: [%s] (see README, Sweeps on one machine)", plan.path, " ".join(argv),
                    TRAIN_MODULE, ", ".join(OUR_COMMAND))


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
    text = "could not start" if run.exit_code is None else f"exit {run.exit_code}"
    return f"{text}: {run.reason}" if run.reason else text


def error_line(path: Path) -> str | None:
    """The last one-line error a run logged (`ERROR: ...`), without its prefix, or else the log's last line (what
    a command that never reached our training said, such as Python's "can't open file"); None for no log."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [line for line in lines if line.startswith(ERROR_LINE_PREFIX)]
    if errors:
        return errors[-1].removeprefix(ERROR_LINE_PREFIX)
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def record_if_readable(run_dir: Path) -> RunRecord | None:
    """The run's record, or None when it has none or one that cannot be read."""
    try:
        return read_record(run_dir)
    except UserError:
        return None


def log_tail(path: Path, lines: int = FAILED_LOG_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- the terminal view ------------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    run: LocalRun
    epoch: int  # completed epochs
    epochs: int
    best_val_acc: float | None
    seconds: float | None  # wall time of the run, every attempt together
    epoch_fraction: float = 0.0  # of the epoch in progress, from the run's progress file
    images_per_second: float | None = None

    @property
    def done_epochs(self) -> float:
        """Epochs done, the one in progress counted by its steps."""
        return min(self.epochs, self.epoch + self.epoch_fraction)

    @property
    def seconds_left(self) -> float | None:
        """At the pace so far: the run's time over the epochs done, times the epochs left."""
        if self.run.state != "running" or not self.seconds or self.done_epochs <= 0:
            return None
        return self.seconds * (self.epochs - self.done_epochs) / self.done_epochs


@dataclass
class RunTiming:
    """When a run's process started and when the sweep first saw it train (time.monotonic() seconds): what its
    projected wall time is made of."""

    started_at: float
    first_steps: tuple[float, float] | None = None  # (when, epochs done then): the first progress seen

    def saw(self, done_epochs: float, now: float) -> None:
        if self.first_steps is None and done_epochs > 0:
            self.first_steps = (now, done_epochs)

    def projected_seconds(self, done_epochs: float, epochs: int, now: float) -> float | None:
        """Process start to exit: its start as measured, then its epochs at the rate since its first steps (which
        counts validation once an epoch has ended). None before there is a rate."""
        if self.first_steps is None or now <= self.first_steps[0] or done_epochs <= self.first_steps[1]:
            return None
        (seen_at, done_then) = self.first_steps
        rate = (done_epochs - done_then) / (now - seen_at)  # epochs per second
        return seen_at - self.started_at + (epochs - done_then) / rate


def progress_of(run: LocalRun, record: RunRecord | None, base: Config, run_dir: Path | None = None) -> RunProgress:
    """A run's progress from its record and, while it runs, its progress file (rewritten inside each epoch)."""
    epochs = int(run.params.get("epochs", base.epochs))
    if record is None:
        return RunProgress(run, 0, epochs, None, None)
    scores = [entry[SELECTION_METRIC] for entry in record.history]
    progress = RunProgress(run, len(record.history), epochs, max(scores) if scores else None,
                           record.seconds or record.updated_at - record.started_at)
    live = read_progress(run_dir) if run_dir is not None and run.state == "running" else None
    if live is not None and live.epoch == progress.epoch + 1 and live.steps:
        progress.epoch_fraction = live.step / live.steps
        progress.images_per_second = live.images_per_second
        progress.seconds = live.seconds + max(0.0, time.time() - live.updated_at)  # ticking between writes
    elif live is not None:
        progress.seconds = max(progress.seconds, live.seconds + max(0.0, time.time() - live.updated_at))
    return progress


def progress_text(item: RunProgress) -> str:
    """`1/10 epochs (42% of epoch 2), 1,234 img/s, 1m 05s, about 9m 10s left`: a running run, for a log line."""
    if item.seconds is None:
        return "starting (loading data and W&B)"
    steps = f" ({100 * item.epoch_fraction:.0f}% of epoch {item.epoch + 1})" if item.epoch_fraction else ""
    speed = f", {item.images_per_second:,.0f} img/s" if item.images_per_second else ""
    left = f", about {duration_text(item.seconds_left)} left" if item.seconds_left is not None else ""
    return f"{item.epoch}/{item.epochs} epochs{steps}{speed}, {duration_text(item.seconds)}{left}"


def sweep_seconds_left(progress: Sequence[RunProgress], total_runs: int | None, workers: int,
                       timings: Mapping[str, RunTiming], whole_runs: Sequence[float], now: float) -> float | None:
    """The sweep's time left. Each run costs a whole run's wall time, not just its epochs: its start (Python, torch,
    W&B, the data), its validation passes and its end (the test pass, W&B's finish) are paid by every run, and the
    runs not yet started wait for a free worker. (The bar's own estimate, epochs left over the recent rate of
    training steps, left all of that out: 1:58 left at 0:10 of a trial that took 3:45.)

    - A whole run: the median of those that finished in this process (`whole_runs`, seconds from process start to
      exit); before one has, the mean of the running runs' projections (`RunTiming.projected_seconds`).
    - A running run of this process ends at its projection (a whole run, before its first steps; at least a whole
      run once some have finished, since the projection cannot see the run's end); another process's run, a whole
      run after its own clock started. Each run not yet started takes a whole run on the first worker to come free.
    """
    if not total_runs:
        return None
    running = [item for item in progress if item.run.state == "running"]
    elapsed, projected = {}, {}
    for item in running:
        timing = timings.get(item.run.run_id)
        elapsed[item.run.run_id] = now - timing.started_at if timing else item.seconds or 0.0
        if timing and (seconds := timing.projected_seconds(item.done_epochs, item.epochs, now)) is not None:
            projected[item.run.run_id] = seconds
    whole = statistics.median(whole_runs) if whole_runs else (
        statistics.mean(projected.values()) if projected else None)
    if whole is None:
        return None
    # When each worker comes free, in seconds from now (runs beyond this process's workers are other processes').
    # Once runs have finished, a running run takes at least a whole run: its projection leaves its end out.
    ends = {run_id: max(projected.get(run_id, whole), whole if whole_runs else 0.0) for run_id in elapsed}
    free_at = [max(0.0, ends[run_id] - seconds) for run_id, seconds in elapsed.items()]
    free_at += [0.0] * max(0, workers - len(free_at))
    heapq.heapify(free_at)
    ended = sum(item.run.state in (*DONE, "failed") for item in progress)
    for _ in range(max(0, total_runs - ended - len(running))):
        heapq.heappush(free_at, heapq.heappop(free_at) + whole)
    return max(free_at)


class LogView:
    """Plain log lines, for logs and pipes: each run's start and end, and every PROGRESS_LOG_SECONDS a line per
    running run."""

    def __init__(self, shown: Sequence[str], progress_every: float = PROGRESS_LOG_SECONDS) -> None:
        self.shown = shown
        self.progress_every = progress_every
        self.next_progress_log = time.monotonic() + progress_every

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

    def refresh(self, progress: Sequence[RunProgress], total_runs: int | None,
                seconds_left: float | None = None) -> None:
        if time.monotonic() < self.next_progress_log:
            return
        self.next_progress_log = time.monotonic() + self.progress_every
        for item in progress:
            if item.run.state == "running":
                log.info("run %s: %s", item.run.run_id, progress_text(item))


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
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("epochs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                       TimeElapsedColumn(), TextColumn("remaining {task.fields[left]}"))
        self.task = self.bar.add_task("", total=None, left="-:--")
        self.live = Live(console=Console(stderr=True), refresh_per_second=2)
        self.entered = contextlib.ExitStack()
        self.entered.enter_context(self.live)
        self.entered.enter_context(logs_to_current_stderr())  # log lines above the table, not onto its last line
        return self

    def __exit__(self, *exc: object) -> None:
        self.entered.__exit__(*exc)

    def started(self, run: LocalRun, gpu: str | None) -> None:
        return None

    def ended(self, progress: RunProgress, log_path: Path) -> None:
        return None

    def refresh(self, progress: Sequence[RunProgress], total_runs: int | None,
                seconds_left: float | None = None) -> None:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        # The run id, its state and its figures stay whole on a narrow terminal; the settings and the bar give way.
        table.add_column("run", no_wrap=True, min_width=RUN_ID_CHARS)
        for column in ("state", *self.shown, "progress", "epoch", "best val acc", "img/s", "time", "left"):
            table.add_column(column, no_wrap=column not in self.shown and column != "progress")
        for item in progress:
            best = "" if item.best_val_acc is None else f"{100 * item.best_val_acc:.2f}%"
            speed = "" if item.images_per_second is None else f"{item.images_per_second:,.0f}"
            seconds = "" if item.seconds is None else duration_text(item.seconds)
            left = "" if item.seconds_left is None else duration_text(item.seconds_left)
            bar = ProgressBar(total=item.epochs, completed=item.done_epochs, width=RUN_BAR_WIDTH)
            table.add_row(item.run.run_id, item.run.state, *(str(item.run.params.get(name)) for name in self.shown),
                          bar, f"{item.epoch}/{item.epochs}", best, speed, seconds, left)
        done = sum(item.run.state in (*DONE, "failed") for item in progress)
        expected = max(total_runs or 0, len(progress))
        epochs_each = max((item.epochs for item in progress), default=0)
        # Fractional epochs, moving every progress write; the time left is the sweep's estimate (sweep_seconds_left).
        self.bar.update(self.task, completed=sum(item.done_epochs for item in progress),
                        total=expected * epochs_each if total_runs else None,
                        description=f"runs {done}/{total_runs if total_runs else '?'}",
                        left="-:--" if seconds_left is None else duration_text(seconds_left))
        self.live.update(Group(table, self.bar))


# --- offline: W&B's proposer on this machine ----------------------------------------------------------------


@dataclass
class LocalSweepResult:
    exit_code: int
    state: SweepState
    out_dir: Path
    user_mistake: str | None = None  # the one-line error that stopped the sweep early, when one did


@dataclass
class Worker:
    """A run in progress: its process, the GPU it holds and its log file."""

    process: subprocess.Popen
    gpu: str | None
    log_file: IO[bytes]
    timing: RunTiming = field(default_factory=lambda: RunTiming(time.monotonic()))


@dataclass(frozen=True)
class Outcome:
    """How a run of this process ended, to be recorded in the sweep's state."""

    run_id: str
    state: str
    exit_code: int | None
    reason: str | None = None


class LocalSweep:
    """W&B's proposer on this machine: proposes runs, starts them as the agent would, and feeds back results.

    Any number of these, in processes on this host or others, can work on one sweep folder: each change to the
    shared state is a transaction (`SweepFolder.transaction`), each running run is leased to its owner, and each
    process claims runs (a preempted or expired one first, then the proposer's next) for its free workers. A
    process ends when every run of the sweep has ended, or is leased to a live process: it waits for those, to
    take over any whose lease runs out.
    """

    def __init__(self, plan: SweepPlan, out_dir: Path, gpus: Sequence[str | None], count: int | None,
                 project: str | None, view: LogView, lease_seconds: float = LEASE_SECONDS, pack: bool = False) -> None:
        from .wandb_sweep import new_id

        self.plan, self.out_dir, self.count, self.project, self.view = plan, out_dir, count, project, view
        self.lease_seconds = lease_seconds
        self.owner = worker_name()
        self.folder = SweepFolder(out_dir, plan.config, new_id)
        self.joined_at = time.time()
        with self.folder.transaction() as state:  # creates the sweep, or joins it (another sweep's folder: refused)
            self.state = state  # the latest snapshot, for the view and the final table
        self.base = Config.from_mapping({name: spec["value"] for name, spec in plan.config["parameters"].items()
                                         if "value" in spec})
        self.total = min(filter(None, (plan.grid_size, count)), default=None)
        self.free_gpus = list(gpus)
        self.workers = len(gpus)
        # With `pack`, the runs of each GPU train together in one trainer (their processes hand it their training).
        self.trainers = Trainers(gpus, out_dir / TRAINER_LOGS / socket.gethostname()) if pack else None
        self.active: dict[str, Worker] = {}
        self.stopping: set[str] = set()  # runs that early_terminate stopped
        self.whole_runs: list[float] = []  # seconds from process start to exit of each run that finished here
        self.done_records: dict[str, RunRecord | None] = {}  # records of done runs do not change: read them once
        self.renewed_at = -math.inf  # time.monotonic() of the last lease renewal
        self.proposer_done = False  # the proposer had no more runs (a complete grid): it never has again
        self.gave_up = False  # too many runs failed
        self.user_mistake: str | None = None  # a run's one-line error that every other run would repeat
        for run in self.state.runs:  # a done run's record that cannot be read is refused before any run starts
            self.record_of(run)

    def record_of(self, run: LocalRun) -> RunRecord | None:
        """A done run's record, read once (one that cannot be read is a UserError); another run's, when readable
        (its own process rewrites it, or fails on it, in one line in its log)."""
        if run.state not in DONE:
            return record_if_readable(self.out_dir / run.run_id)
        if run.run_id not in self.done_records:
            self.done_records[run.run_id] = read_record(self.out_dir / run.run_id)
        return self.done_records[run.run_id]

    # --- transactions on the shared state (called with its lock held) ---

    def claimable(self, run: LocalRun, now: float) -> bool:
        """Preempted runs; runs whose owner's lease ran out; and failed runs from before this process joined
        (the same command again retries them, once)."""
        if run.state in CLAIMABLE:
            return True
        if run.state == "failed":
            return (run.ended_at or 0.0) < self.joined_at
        return run.owner != self.owner and run.lease_expired(now)

    def claim(self, state: SweepState, now: float) -> LocalRun | None:
        """The next run for a free worker, leased to this process: one to resume or retry, else a new proposal."""
        if self.user_mistake is not None:
            return None
        run = next((run for run in state.runs if self.claimable(run, now)), None)
        if run is not None and run.state == "running":
            log.warning("run %s: the lease of %s ran out %.0f s ago; taking it over", run.run_id, run.owner,
                        now - (run.heartbeat_at or now))
        if run is None:
            run = self.propose(state)
            if run is None:
                return None
            state.runs.append(run)
        run.state, run.owner, run.heartbeat_at, run.lease_seconds = "running", self.owner, now, self.lease_seconds
        run.exit_code = run.ended_at = run.reason = None
        run.attempts += 1
        return run

    def propose(self, state: SweepState) -> LocalRun | None:
        """The proposer's next run, seeing every run of the sweep (all processes'), or None."""
        if self.proposer_done or (self.count is not None and len(state.runs) >= self.count):
            return None
        failed, finished = state.count("failed"), state.count("finished")
        if failed >= max(finished, MAX_INITIAL_FAILURES):
            if not self.gave_up:
                log.error("%d runs failed and %d finished: no new runs (as `wandb agent` does)", failed, finished)
            self.gave_up = True
            return None
        proposal = sweep_proposer().next_run(self.plan.config, [proposer_run(run, self.record_of(run))
                                                                for run in state.runs])
        if proposal is None:  # the grid is complete
            self.proposer_done = True
            return None
        from .wandb_sweep import new_id

        # Through JSON, as from W&B's server: the proposer's numpy numbers become plain ones.
        params = json.loads(json.dumps({name: spec["value"] for name, spec in proposal.config.items()},
                                       default=lambda number: number.item()))
        return LocalRun(new_id(), params)

    def record_outcomes(self, state: SweepState, outcomes: Sequence[Outcome], now: float) -> list[LocalRun]:
        """Mark this process's ended runs; a run another process has taken over keeps that one's state."""
        ended = []
        for outcome in outcomes:
            run = state.find(outcome.run_id)
            if run is None or run.owner != self.owner or run.state != "running":
                log.warning("run %s: taken over by %s meanwhile; this attempt's end (%s) is not recorded",
                            outcome.run_id, run.owner if run else "nobody", outcome.state)
                continue
            run.state, run.exit_code, run.reason, run.ended_at = outcome.state, outcome.exit_code, outcome.reason, now
            ended.append(run)
        return ended

    def renew_leases(self, state: SweepState, now: float) -> list[str]:
        """Renew the leases of this process's runs; the runs it lost (taken over after a stall) are returned."""
        lost = []
        for run_id in self.active:
            run = state.find(run_id)
            if run is not None and run.owner == self.owner and run.state == "running":
                run.heartbeat_at = now
            else:
                lost.append(run_id)
        return lost

    # --- one step of the poll loop ---

    def step(self) -> bool:
        """Reap ended runs; in one transaction record them and renew leases when due; then claim and start runs for
        the free workers, one transaction each (a run that cannot start is recorded before the next proposal).
        Whether it claimed any."""
        outcomes = self.reap()
        renew = time.monotonic() - self.renewed_at >= renew_interval(self.lease_seconds)
        if outcomes or renew:
            with self.folder.transaction() as state:
                now = time.time()
                ended = self.record_outcomes(state, outcomes, now)
                lost = self.renew_leases(state, now) if renew else []
                self.state = state
            if renew:
                self.renewed_at = time.monotonic()
            self.report_ended(ended)
            for run_id in lost:
                log.warning("run %s: another process took it over (this one's lease ran out); stopping this attempt",
                            run_id)
                self.drop(run_id)
        claimed = False
        while self.free_gpus:
            with self.folder.transaction() as state:
                run = self.claim(state, time.time())
                self.state = state
            if run is None:
                break
            claimed = True
            self.start(run, self.free_gpus.pop(0))
        return claimed

    def report_ended(self, runs: Sequence[LocalRun]) -> None:
        for run in runs:
            self.view.ended(progress_of(run, self.record_of(run), self.base), self.out_dir / run.run_id / RUN_LOG)
            self.watch_for_user_mistake(run)

    def watch_for_user_mistake(self, run: LocalRun) -> None:
        """Before any run of the sweep has finished, a run's user mistake (data not found, no download possible) is
        taken for the sweep's: no new runs, each of which would start a process and W&B only to fail the same way.
        A run that gets through shows a mistake seen before was that run's own."""
        if run.state in DONE:
            self.user_mistake = None
        elif (run.exit_code == USER_MISTAKE_EXIT and self.user_mistake is None
              and not any(other.state in DONE for other in self.state.runs)):
            self.user_mistake = error_line(self.out_dir / run.run_id / RUN_LOG) or f"run {run.run_id}: {exit_text(run)}"

    def record_now(self, outcomes: Sequence[Outcome]) -> None:
        with self.folder.transaction() as state:
            ended = self.record_outcomes(state, outcomes, time.time())
            self.state = state
        self.report_ended(ended)

    def others_running(self) -> bool:
        return any(run.state == "running" and run.owner != self.owner for run in self.state.runs)

    # --- the runs' processes ---

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
            self.record_now([Outcome(run.run_id, "failed", None)])
            return
        self.active[run.run_id] = Worker(process, gpu, log_file)
        self.view.started(run, gpu)

    def environment(self, run: LocalRun, gpu: str | None) -> dict[str, str]:
        """The environment `wandb agent` gives a run, offline.

        Not WANDB_SWEEP_ID: the local sweep id is unknown to the W&B server, and `wandb sync` refuses runs of an
        unknown sweep ("sweep ... not found", wandb/wandb#8115). The runs are grouped by sweep instead.
        """
        name = sweep_name(self.plan)
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
        if self.trainers is not None:
            env.update(self.trainers.environment(gpu))
        return env

    def release(self, run_id: str) -> Worker:
        worker = self.active.pop(run_id)
        worker.log_file.close()
        self.free_gpus.append(worker.gpu)
        return worker

    def drop(self, run_id: str) -> None:
        """Stop a run this process no longer owns, without recording anything."""
        stop_processes([self.active[run_id].process], STOP_GRACE_SECONDS)
        self.release(run_id)

    def outcome(self, run_id: str, exit_code: int, stopped_by_signal: bool = False) -> Outcome:
        """What a run's exit status, and its record, say about how it ended. A record that says finished wins: the
        run's process may be stopped or killed after writing it (while W&B shuts down), and it is never run again."""
        record = record_if_readable(self.out_dir / run_id)
        if record is not None and record.status == "finished":
            return Outcome(run_id, "finished", exit_code)
        if run_id in self.stopping:
            return Outcome(run_id, "stopped", exit_code)
        if exit_code == 0:
            if record is None:
                return Outcome(run_id, "failed", exit_code, NO_RECORD_REASON)
            return Outcome(run_id, "failed", exit_code, f"exited 0, but its run record says {record.status}")
        if exit_code > SIGNAL_EXIT_BASE or stopped_by_signal:  # stopped by a signal after saving its state
            return Outcome(run_id, "preempted", exit_code)
        return Outcome(run_id, "failed", exit_code)

    def reap(self) -> list[Outcome]:
        """The runs whose process has ended (their GPUs freed)."""
        outcomes = []
        for run_id in [run_id for run_id, worker in self.active.items() if worker.process.poll() is not None]:
            worker = self.release(run_id)
            outcomes.append(self.outcome(run_id, worker.process.returncode))
            if outcomes[-1].state == "finished":
                self.whole_runs.append(time.monotonic() - worker.timing.started_at)
        return outcomes

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
        """Stop this process's runs (each saves its state) and release them: they resume in any process."""
        stop_processes([worker.process for worker in self.active.values()], STOP_GRACE_SECONDS)
        self.record_now([self.outcome(run_id, self.release(run_id).process.returncode, stopped_by_signal=True)
                         for run_id in list(self.active)])
        log.info("stopped by signal %d", signum)

    def run(self) -> LocalSweepResult:
        waiting = False  # idle while other processes' runs are in progress (said once)
        # Leaving, the view closes last, the trainers (whose runs have ended by then) first.
        with stop_on_signals(SUPERVISOR_STOP_SIGNALS) as received, self.view, \
                self.trainers or contextlib.nullcontext():
            while not received:
                if self.trainers is not None:
                    self.trainers.revive()
                claimed = self.step()
                self.early_terminate()
                progress = [progress_of(run, self.record_of(run), self.base, self.out_dir / run.run_id)
                            for run in self.state.runs]
                now = time.monotonic()
                timings = {run_id: worker.timing for run_id, worker in self.active.items()}
                for item in progress:
                    if item.run.run_id in timings:
                        timings[item.run.run_id].saw(item.done_epochs, now)
                self.view.refresh(progress, self.total, sweep_seconds_left(progress, self.total, self.workers,
                                                                           timings, self.whole_runs, now))
                if not claimed and not self.active:
                    if not self.others_running():
                        break
                    if not waiting:
                        log.info("waiting for the runs of other processes of this sweep (to take over any whose "
                                 "lease runs out); Ctrl-C to leave them")
                    waiting = True
                time.sleep(POLL_SECONDS)
            if received:
                self.interrupt(received[0])
                return LocalSweepResult(SIGNAL_EXIT_BASE + received[0], self.state, self.out_dir)
        if self.user_mistake is not None:
            return LocalSweepResult(USER_MISTAKE_EXIT, self.state, self.out_dir, self.user_mistake)
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
                        f"{DEFAULT_OUTPUT_ROOT}/<sweep name>-<digest of its settings>); offline only. Other sweep "
                        "processes, on this host or others (shared filesystem), join the sweep by giving the same "
                        "folder")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                        help="offline: the runs of each GPU train together in one trainer process, each on a CUDA "
                        "stream of its own, where separate processes would time-slice the GPU (default: on when a "
                        "GPU has more than one run; --pack on a CPU makes the workers' runs take turns in one "
                        "process)")
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
    if per_gpu is None:
        per_gpu = workers // len(indices) if workers is not None else resolve_runs_per_gpu(None, indices)
    return [index for index in indices for _ in range(per_gpu)]


def shares_a_gpu(gpus: Sequence[str | None]) -> bool:
    """Whether some GPU has more than one worker: then its runs are packed by default."""
    pinned = [gpu for gpu in gpus if gpu is not None]
    return len(pinned) > len(set(pinned))


def sweep_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("sweep", rest)
    sweep_proposer()  # first: without the sweep extra (a worker's install), say so before anything else
    if args.count is not None and args.count < 1:
        raise UserError(f"--count: must be >= 1, got {args.count}")
    if not args.lease_seconds > 0:
        raise UserError(f"--lease-seconds: must be > 0, got {args.lease_seconds}")
    gpus = parse_gpus(args.gpus, args.workers, args.runs_per_gpu)
    plan = load_sweep(args.sweep_file, args.overrides)
    warn_unless_our_entry_point(plan)
    if plan.grid_size is None and args.count is None:
        log.warning("%s: method %s without --count proposes runs until it is stopped (Ctrl-C; the same command "
                    "resumes it); --count N ends it after N runs", plan.path, plan.config["method"])
    project = args.project or plan.config.get("project") or os.environ.get("WANDB_PROJECT")
    mode = choose_mode()
    if not args.offline and mode == "online":
        return run_online_sweep(plan, gpus, args.count, project or DEFAULT_PROJECT)
    out_dir = args.output_dir or default_output_dir(plan)
    shown = [name for name, spec in plan.config["parameters"].items() if "value" not in spec]
    view = LiveView(shown) if sys.stderr.isatty() else LogView(shown)
    pack = args.pack if args.pack is not None else shares_a_gpu(gpus)
    local_sweep = LocalSweep(plan, out_dir, gpus, args.count, project, view, args.lease_seconds, pack)  # may refuse
    log.info("%s: running the sweep offline in %s (W&B's sweep proposer on this machine); upload the runs later "
             "with `wandb sync %s`", offline_reason(args.offline, mode), out_dir, offline_runs_glob(out_dir))
    result = local_sweep.run()
    print_results(result)
    return result.exit_code


def offline_reason(asked: bool, mode: str) -> str:
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
        record = record_if_readable(result.out_dir / run.run_id)
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
            path = result.out_dir / run.run_id / RUN_LOG
            print(f"run {run.run_id} failed ({exit_text(run)}); last lines of {path}:\n{log_tail(path)}\n")
    print(f"sweep folder: {result.out_dir}  (report: cifar-resnet report {result.out_dir})")
    if result.exit_code > SIGNAL_EXIT_BASE:
        print("stopped; run the same command to resume")
