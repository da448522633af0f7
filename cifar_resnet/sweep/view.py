"""The sweep's progress as its runs train: a live table and bar on a terminal (`LiveView`), log lines elsewhere
(`LogView`), and the time the sweep has left."""

from __future__ import annotations

import contextlib
import heapq
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..logs import logs_to_current_stderr
from ..records import SELECTION_METRIC, RunFolder, RunRecord, read_progress
from ..table import duration_text
from .state import ENDED, LocalRun

if TYPE_CHECKING:  # rich is imported where a live table is drawn
    from rich.console import Console
    from rich.table import Table

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 30.0  # outside a terminal, one progress line per running run this often
RUN_BAR_WIDTH = 20  # characters of each run's bar in the live table
UNBOUNDED_WIDTH = 10_000  # columns: wider than any table of runs


def exit_text(run: LocalRun) -> str:
    text = "could not start" if run.exit_code is None else f"exit {run.exit_code}"
    return f"{text}: {run.reason}" if run.reason else text


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


def progress_of(run: LocalRun, record: RunRecord | None, base: Config, folder: RunFolder | None = None
                ) -> RunProgress:
    """A run's progress from its record and, while it runs, its progress file (rewritten inside each epoch)."""
    epochs = int(run.params.get("epochs", base.epochs))
    if record is None:
        return RunProgress(run, 0, epochs, None, None)
    scores = [entry[SELECTION_METRIC] for entry in record.history]
    progress = RunProgress(run, len(record.history), epochs, max(scores) if scores else None,
                           record.seconds or record.updated_at - record.started_at)
    live = read_progress(folder.path) if folder is not None and run.state == "running" else None
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
    ended = sum(item.run.state in ENDED for item in progress)
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

        done = sum(item.run.state in ENDED for item in progress)
        expected = max(total_runs or 0, len(progress))
        epochs_each = max((item.epochs for item in progress), default=0)
        # Fractional epochs, moving every progress write; the time left is the sweep's estimate (sweep_seconds_left).
        self.bar.update(self.task, completed=sum(item.done_epochs for item in progress),
                        total=expected * epochs_each if total_runs else None,
                        description=f"runs {done}/{total_runs if total_runs else '?'}",
                        left="-:--" if seconds_left is None else duration_text(seconds_left))
        self.live.update(Group(runs_table(progress, self.shown, self.live.console), self.bar))


# The live table's columns in the order they give way on a narrow terminal, first to go first: the run id and its
# swept values stay whole, or the runs could not be told apart (issue 27: at 80 columns every value was cut to
# `0.0…`). The per-run bar goes first: the epoch column says as much.
COLUMNS_GIVING_WAY = ("progress", "img/s", "time", "left", "best val acc", "epoch", "state")


def runs_table(progress: Sequence[RunProgress], shown: Sequence[str], console: Console) -> Table:
    """The live table of runs, with the columns that fit `console`'s width whole (see COLUMNS_GIVING_WAY)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    rows = []
    for item in progress:
        rows.append({
            "run": item.run.run_id, "state": item.run.state,
            **{name: str(item.run.params.get(name)) for name in shown},
            "progress": ProgressBar(total=item.epochs, completed=item.done_epochs, width=RUN_BAR_WIDTH),
            "epoch": f"{item.epoch}/{item.epochs}",
            "best val acc": "" if item.best_val_acc is None else f"{100 * item.best_val_acc:.2f}%",
            "img/s": "" if item.images_per_second is None else f"{item.images_per_second:,.0f}",
            "time": "" if item.seconds is None else duration_text(item.seconds),
            "left": "" if item.seconds_left is None else duration_text(item.seconds_left),
        })
    columns = ["run", "state", *shown, "progress", "epoch", "best val acc", "img/s", "time", "left"]
    for giving_way in (None, *COLUMNS_GIVING_WAY):
        if giving_way is not None:
            columns.remove(giving_way)
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in columns:
            table.add_column(column, no_wrap=True)
        for row in rows:
            table.add_row(*(row[column] for column in columns))
        # Its width with nothing cut: measured as if the console had room for any table.
        if console.measure(table, options=console.options.update_width(UNBOUNDED_WIDTH)).maximum <= console.width:
            break
    return table
