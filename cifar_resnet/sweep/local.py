"""An offline sweep on this machine: W&B's proposer proposes the runs, `LocalSweep` starts each as `wandb agent`
would (the sweep's command, in a fresh process, W&B offline) and feeds their records back, sharing the sweep's
folder with any other process that works on it (see `state.py`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..children import child_environment, exit_status, start_process, stop_processes
from ..config import Config
from ..errors import UserError
from ..packing.pool import OFF, TrainerPool
from ..records import RunFolder, RunRecord, read_record
from ..run_contract import ERROR_LINE_PREFIX, EXIT_CRASH, EXIT_OK, EXIT_USAGE, SIGNAL_EXIT_BASE
from ..signals import SUPERVISOR_STOP_SIGNALS, stop_on_signals
from ..wandb_sweep import new_id, run_argv, write_param_file
from .plan import SweepPlan, proposer_run, runs_to_stop, sweep_name, sweep_proposer
from .state import (
    CLAIMABLE,
    DONE,
    LEASE_SECONDS,
    LocalRun,
    SweepFolder,
    SweepState,
    owner_name,
    renew_interval,
)
from .view import LogView, RunTiming, exit_text, progress_of, sweep_seconds_left

log = logging.getLogger(__name__)

TRAINER_LOGS = "trainers"  # in the sweep's folder, a folder per host: each trainer's log (`--pack`)
# In a run's folder, beside the run's own files (RunFolder), the files `wandb agent` would give its command:
PARAM_FILE = "sweep-params.yaml"  # what WANDB_SWEEP_PARAM_PATH names
ARGS_JSON_FILE = "sweep-args.json"  # for a command that uses ${args_json_file}
POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 30.0  # a run saves its resume checkpoint on SIGTERM; after this it is killed
MAX_INITIAL_FAILURES = 5  # `wandb agent`'s: no new runs once this many failed and no more finished
NO_RECORD_REASON = "exited 0 without a run record: the sweep's command did not run cifar_resnet.train"


def run_params(run: LocalRun, out_dir: Path) -> dict[str, Any]:
    """The settings a run gets: the proposer's proposal, and the sweep folder as its output_dir."""
    return {**run.params, "output_dir": str(out_dir.resolve())}


def error_line(path: Path) -> str | None:
    """The last one-line error a run logged (`ERROR: ...`), without its prefix, or else the log's last line (what
    a command that never reached our training said, such as Python's "can't open file"); None for no log."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [line for line in lines if line.startswith(ERROR_LINE_PREFIX)]
    if errors:
        return errors[-1].removeprefix(ERROR_LINE_PREFIX)
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def record_if_readable(folder: RunFolder) -> RunRecord | None:
    """The run's record, or None when it has none or one that cannot be read."""
    try:
        return read_record(folder.path)
    except UserError:
        return None


@dataclass
class LocalSweepResult:
    exit_code: int
    state: SweepState
    out_dir: Path
    user_mistake: str | None = None  # the one-line error that stopped the sweep early, when one did


@dataclass
class Attempt:
    """A run in progress in this process: one attempt of it (LocalRun.attempts counts them), its process, the GPU it
    holds and its log file."""

    process: subprocess.Popen
    gpu: str | None
    log_file: IO[bytes]
    timing: RunTiming = field(default_factory=lambda: RunTiming(time.monotonic()))


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt of a run (its process) ended, to be recorded in the sweep's state."""

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
                 project: str | None, view: LogView, lease_seconds: float = LEASE_SECONDS, pack: str = OFF) -> None:
        self.plan, self.out_dir, self.count, self.project, self.view = plan, out_dir, count, project, view
        self.lease_seconds = lease_seconds
        self.owner = owner_name()
        self.folder = SweepFolder(out_dir, plan.config, new_id)
        self.joined_at = time.time()
        with self.folder.transaction() as state:  # creates the sweep, or joins it (another sweep's folder: refused)
            self.state = state  # the latest snapshot, for the view and the final table
        self.base = Config.from_mapping({name: spec["value"] for name, spec in plan.config["parameters"].items()
                                         if "value" in spec})
        self.total = min(filter(None, (plan.grid_size, count)), default=None)
        self.free_gpus = list(gpus)
        self.workers = len(gpus)
        # Unless `pack` is off, the runs of each GPU train together in one trainer (their processes hand it their
        # training), on streams or fused.
        self.trainers = None if pack == OFF else TrainerPool(gpus, out_dir / TRAINER_LOGS / socket.gethostname(), pack)
        self.active: dict[str, Attempt] = {}
        self.stopping: set[str] = set()  # runs that early_terminate stopped
        self.whole_runs: list[float] = []  # seconds from process start to exit of each run that finished here
        self.done_records: dict[str, RunRecord | None] = {}  # records of done runs do not change: read them once
        self.renewed_at = -math.inf  # time.monotonic() of the last lease renewal
        self.proposer_done = False  # the proposer had no more runs (a complete grid): it never has again
        self.gave_up = False  # too many runs failed
        self.started_any = False  # whether this process started a run (else it found nothing left to do)
        self.user_mistake: str | None = None  # a run's one-line error that every other run would repeat
        for run in self.state.runs:  # a done run's record that cannot be read is refused before any run starts
            self.record_of(run)

    def run_folder(self, run_id: str) -> RunFolder:
        return RunFolder.of(self.out_dir, run_id)

    def record_of(self, run: LocalRun) -> RunRecord | None:
        """A done run's record, read once (one that cannot be read is a UserError); another run's, when readable
        (its own process rewrites it, or fails on it, in one line in its log)."""
        if run.state not in DONE:
            return record_if_readable(self.run_folder(run.run_id))
        if run.run_id not in self.done_records:
            self.done_records[run.run_id] = read_record(self.run_folder(run.run_id).path)
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
        # Through JSON, as from W&B's server: the proposer's numpy numbers become plain ones.
        params = json.loads(json.dumps({name: spec["value"] for name, spec in proposal.config.items()},
                                       default=lambda number: number.item()))
        return LocalRun(new_id(), params)

    def record_ends(self, state: SweepState, ends: Sequence[AttemptEnd], now: float) -> list[LocalRun]:
        """Mark this process's ended runs; a run another process has taken over keeps that one's state."""
        ended = []
        for end in ends:
            run = state.find(end.run_id)
            if run is None or run.owner != self.owner or run.state != "running":
                log.warning("run %s: taken over by %s meanwhile; this attempt's end (%s) is not recorded",
                            end.run_id, run.owner if run else "nobody", end.state)
                continue
            run.state, run.exit_code, run.reason, run.ended_at = end.state, end.exit_code, end.reason, now
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
        ends = self.reap()
        renew = time.monotonic() - self.renewed_at >= renew_interval(self.lease_seconds)
        if ends or renew:
            with self.folder.transaction() as state:
                now = time.time()
                ended = self.record_ends(state, ends, now)
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
            self.view.ended(progress_of(run, self.record_of(run), self.base), self.run_folder(run.run_id).log)
            self.watch_for_user_mistake(run)

    def watch_for_user_mistake(self, run: LocalRun) -> None:
        """Before any run of the sweep has finished, a run's user mistake (data not found, no download possible) is
        taken for the sweep's: no new runs, each of which would start a process and W&B only to fail the same way.
        A run that gets through shows a mistake seen before was that run's own."""
        if run.state in DONE:
            self.user_mistake = None
        elif (run.exit_code == EXIT_USAGE and self.user_mistake is None
              and not any(other.state in DONE for other in self.state.runs)):
            self.user_mistake = error_line(self.run_folder(run.run_id).log) or f"run {run.run_id}: {exit_text(run)}"

    def record_now(self, ends: Sequence[AttemptEnd]) -> None:
        with self.folder.transaction() as state:
            ended = self.record_ends(state, ends, time.time())
            self.state = state
        self.report_ended(ended)

    def others_running(self) -> bool:
        return any(run.state == "running" and run.owner != self.owner for run in self.state.runs)

    # --- the runs' processes ---

    def start(self, run: LocalRun, gpu: str | None) -> None:
        folder = self.run_folder(run.run_id)
        folder.path.mkdir(parents=True, exist_ok=True)
        params = run_params(run, self.out_dir)
        write_param_file(folder.path / PARAM_FILE, params)
        command = run_argv(self.plan.config.get("command"), self.plan.config.get("program"), params,
                           folder.path / ARGS_JSON_FILE)
        env = self.environment(run, gpu)
        log_file = open(folder.log, "ab")  # appended: a resumed run keeps its earlier attempts' lines
        try:
            process = start_process(command, env, log_file)
        except OSError as error:  # the sweep's command cannot start: this run fails, the sweep goes on
            log_file.write(f"cannot start {' '.join(command)}: {error}\n".encode())
            log_file.close()
            self.free_gpus.append(gpu)
            self.record_now([AttemptEnd(run.run_id, "failed", None)])
            return
        self.active[run.run_id] = Attempt(process, gpu, log_file)
        self.started_any = True
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
            WANDB_SWEEP_PARAM_PATH=str((self.run_folder(run.run_id).path / PARAM_FILE).resolve()),
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

    def release(self, run_id: str) -> Attempt:
        attempt = self.active.pop(run_id)
        attempt.log_file.close()
        self.free_gpus.append(attempt.gpu)
        return attempt

    def drop(self, run_id: str) -> None:
        """Stop a run this process no longer owns, without recording anything."""
        stop_processes([self.active[run_id].process], STOP_GRACE_SECONDS)
        self.release(run_id)

    def attempt_end(self, run_id: str, process: subprocess.Popen, stopped_by_signal: bool = False) -> AttemptEnd:
        """What a run's ended process, and its record, say about how it ended. A record that says finished wins: the
        run's process may be stopped or killed after writing it (while W&B shuts down), and it is never run again.
        A process killed by signal N (before it could handle it: in its start-up, or SIGKILL) is recorded with exit
        status 128 + N, as a shell reports it and as a run that handled the signal exits."""
        exit_code = exit_status(process)
        record = record_if_readable(self.run_folder(run_id))
        if record is not None and record.status == "finished":
            return AttemptEnd(run_id, "finished", exit_code)
        if run_id in self.stopping:
            return AttemptEnd(run_id, "stopped", exit_code)
        if exit_code == 0:
            if record is None:
                return AttemptEnd(run_id, "failed", exit_code, NO_RECORD_REASON)
            return AttemptEnd(run_id, "failed", exit_code, f"exited 0, but its run record says {record.status}")
        # Stopped by a signal after saving its state (a process killed by one is a failure, unless this one sent it)
        if process.returncode > SIGNAL_EXIT_BASE or stopped_by_signal:
            return AttemptEnd(run_id, "preempted", exit_code)
        return AttemptEnd(run_id, "failed", exit_code)

    def reap(self) -> list[AttemptEnd]:
        """The runs whose process has ended (their GPUs freed)."""
        ends = []
        for run_id in [run_id for run_id, attempt in self.active.items() if attempt.process.poll() is not None]:
            attempt = self.release(run_id)
            ends.append(self.attempt_end(run_id, attempt.process))
            if ends[-1].state == "finished":
                self.whole_runs.append(time.monotonic() - attempt.timing.started_at)
        return ends

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
        stop_processes([attempt.process for attempt in self.active.values()], STOP_GRACE_SECONDS)
        self.record_now([self.attempt_end(run_id, self.release(run_id).process, stopped_by_signal=True)
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
                progress = [progress_of(run, self.record_of(run), self.base, self.run_folder(run.run_id))
                            for run in self.state.runs]
                now = time.monotonic()
                timings = {run_id: attempt.timing for run_id, attempt in self.active.items()}
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
            return LocalSweepResult(EXIT_USAGE, self.state, self.out_dir, self.user_mistake)
        if not self.started_any and self.state.runs and all(run.state in DONE for run in self.state.runs):
            stopped = self.state.count("stopped")
            log.info("all %d runs of the sweep %s already: nothing left to do", len(self.state.runs),
                     f"ended ({stopped} stopped by early_terminate)" if stopped else "finished")
        failed = any(run.state == "failed" for run in self.state.runs)
        return LocalSweepResult(EXIT_CRASH if failed else EXIT_OK, self.state, self.out_dir)
