"""Process plumbing that the entry point and the tools share: logging, signals, and child processes.

A run (`train`), the sweep runner, the agent launcher and the benchmark each start or supervise processes; what
they have in common lives here, so that no tool imports another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

from .errors import UserError
from .run_contract import LOG_FORMAT, SIGNAL_EXIT_BASE

log = logging.getLogger(__name__)

PACKAGE_LOGGER = "cifar_resnet"
# What a run treats as "save your state and stop": SIGTERM (spot preemption, `docker stop`, schedulers) and SIGUSR1
# (Slurm's and others' early warning).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds `cifar_resnet/`
# Stop a tool that supervises children; passed on to them. SIGUSR1 is a batch scheduler's warning (Slurm's
# `--signal=B:USR1@N`, ahead of a time limit).
SUPERVISOR_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What a supervisor passes on instead: W&B's agent forwards SIGUSR1 to its run but then takes the next run, while
# SIGTERM stops both the run (which saves its state) and the agent.
FORWARDED_AS = {signal.SIGUSR1: signal.SIGTERM}
POLL_SECONDS = 0.2  # how often a supervisor forwards signals and checks its children
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def setup_logging() -> None:
    """One line per message on stderr for the package's loggers; W&B's own lines are its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package_log = logging.getLogger(PACKAGE_LOGGER)
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


@contextlib.contextmanager
def logs_to_current_stderr() -> Iterator[None]:
    """While inside, the package's log lines go to `sys.stderr` as it is now. A live display (rich's bars and tables)
    puts a proxy there that prints each line above the display; a handler still writing to the terminal itself would
    print onto the display's last line."""
    handlers = [handler for handler in logging.getLogger(PACKAGE_LOGGER).handlers
                if isinstance(handler, logging.StreamHandler)]
    streams = [handler.stream for handler in handlers]
    # Set, not setStream(): that flushes the stream it replaces, which may be closed (an in-process caller's
    # captured stderr) and has nothing left to flush: every log line is flushed as it is written.
    for handler in handlers:
        handler.stream = sys.stderr
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams):
            handler.stream = stream


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[list[int]]:
    """While inside, `signals` are recorded instead of killing the process; the yielded list holds them, in order."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_ignoring_stop_signals(status: int) -> NoReturn:
    """End this process with `status`, ignoring stop signals from here on. What the process did is done and
    recorded; the interpreter's own exit takes seconds after torch and W&B (it collects their objects), and a
    SIGTERM then would end it as 128 + 15, which a supervisor takes for a preempted run."""
    for sig in SUPERVISOR_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(status)


def reject_unknown_arguments(command: str, rest: Sequence[str]) -> None:
    """The CLI passes what argparse did not know on to the handlers; a tool that takes none refuses it here."""
    if rest:
        raise UserError(f"{command}: unknown argument {rest[0]!r} (see cifar-resnet {command} --help)")


# --- child processes ---------------------------------------------------------------------------------------------


def usable_cpu_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPU cores this process may use: its affinity, capped by a cgroup CPU quota (a container's `--cpus`, a
    Kubernetes CPU limit), which the affinity does not show (a pod limited to 7 cores still sees all of a node's)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or no quota file: the affinity alone
        pass
    return cores


def cpu_threads_per_run(concurrent_runs: int) -> int:
    """The one place that decides a run's CPU threads: the usable cores shared out among the runs at once, so that
    they do not oversubscribe them (on 2 cores, two runs of 2 threads each took 3.8x as long as two runs of 1
    thread). A run alone gets every core; OMP_NUM_THREADS, where set, wins over this everywhere."""
    return max(1, usable_cpu_cores() // concurrent_runs)


def set_cpu_threads(concurrent_runs: int = 1) -> int:
    """Give torch this process's share of the cores as one of `concurrent_runs` (`train`, a benchmark); where
    OMP_NUM_THREADS is set (by the tool that started it, or by the user), torch has read it already. Returns the
    threads torch uses."""
    import torch  # deferred: the tools that never train need not import it

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_threads_per_run(concurrent_runs))
    return torch.get_num_threads()


def child_environment(concurrent_runs: int, **variables: str) -> dict[str, str]:
    """The environment of a training process started by a tool, `variables` added.

    - `python` on PATH is this interpreter (a sweep's `${interpreter}` macro runs `python`), and the package is
      importable even where it is not installed (a copy of the checkout on a GPU machine);
    - the CPU cores are shared out among the runs at once (unless OMP_NUM_THREADS is set already).
    """
    env = {**os.environ, **variables}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_run(concurrent_runs)))
    return env


def start_process(argv: Sequence[str], env: Mapping[str, str] | None = None,
                  output: IO[bytes] | None = None) -> subprocess.Popen:
    """Start a child in a session of its own: a Ctrl-C at the terminal reaches only this process, which then
    stops its children in order (and their own children, such as W&B's service, with them)."""
    return subprocess.Popen(list(argv), env=None if env is None else dict(env), stdout=output,
                            stderr=subprocess.STDOUT if output is not None else None, start_new_session=True)


def stop_processes(processes: Sequence[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM each process, wait up to `grace_seconds` for all, then kill what is left with its session."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def exit_status(process: subprocess.Popen) -> int:
    """The process's exit status as a shell reports it: 128 + N for one killed by signal N."""
    code = process.returncode
    return SIGNAL_EXIT_BASE - code if code < 0 else code


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    gpu: str | None  # the CUDA_VISIBLE_DEVICES value it is pinned to; None: not pinned
    env: Mapping[str, str] = field(default_factory=dict)  # more variables for it (its GPU's trainer)


def run_staggered(launches: Sequence[Launch], stagger_seconds: float, what: str) -> int:
    """Start each launch `stagger_seconds` after the last, forward SIGTERM, SIGINT and SIGUSR1 (as SIGTERM) to those
    running, and wait for all. Returns 0 when all succeeded, else the exit status of the first that failed (128 + N
    for signal N). `what` names the children in log lines ("agent")."""
    return first_failure(run_staggered_statuses(launches, stagger_seconds, what), what)


def first_failure(statuses: Sequence[int], what: str) -> int:
    """0 when every child succeeded, else the first failure's exit status; each failure is logged."""
    for number, status in enumerate(statuses, start=1):
        if status:
            log.error("%s %d exited with status %d", what, number, status)
    return next((status for status in statuses if status), 0)


def run_staggered_statuses(
    launches: Sequence[Launch], stagger_seconds: float, what: str,
    start: Callable[[Sequence[str], Mapping[str, str]], subprocess.Popen] = start_process,
) -> list[int]:
    """`run_staggered`'s work: every child's exit status, in order. `start(argv, env)` starts one."""
    children: list[subprocess.Popen] = []
    forwarded = 0
    # Each child (an agent) runs one run at a time: their runs share the cores as a sweep's do, unless set already.
    threads = {"OMP_NUM_THREADS": str(cpu_threads_per_run(len(launches)))}
    # The handlers only record signals; they are forwarded here, between steps, so that none is lost or sent twice
    # to a child started meanwhile.
    with stop_on_signals(SUPERVISOR_STOP_SIGNALS) as received:

        def pause(seconds: float) -> None:
            """Sleep until `seconds` have passed or a signal comes, forwarding it to every running child."""
            nonlocal forwarded
            deadline, signals_before = time.monotonic() + seconds, len(received)
            while True:
                for signum in received[forwarded:]:
                    log.info("forwarding signal %d to %d %ss", signum, len(children), what)
                    for child in children:
                        if child.poll() is None:
                            child.send_signal(FORWARDED_AS.get(signum, signum))
                forwarded = len(received)
                left = deadline - time.monotonic()
                if left <= 0 or len(received) > signals_before:
                    return
                time.sleep(min(left, POLL_SECONDS))

        for index, launch in enumerate(launches):
            if index:
                pause(stagger_seconds)
            if received:  # asked to stop before every child started: start no more
                break
            pinned = {} if launch.gpu is None else {"CUDA_VISIBLE_DEVICES": launch.gpu}
            children.append(start(launch.argv, {**threads, **os.environ, **pinned, **launch.env}))
            log.info("%s %d of %d started (pid %d) on %s", what, index + 1, len(launches), children[-1].pid,
                     f"GPU {launch.gpu}" if launch.gpu is not None else "no GPU")
        while any(child.poll() is None for child in children):
            pause(POLL_SECONDS)

    return [exit_status(child) for child in children]


def run_logged(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> int:
    """Run a child to its end with its stdout and stderr in `log_path`; its exit status."""
    with open(log_path, "wb") as log_file:
        child = start_process(argv, env, log_file)
        try:
            child.wait()
        except BaseException:  # interrupted while waiting: the child must not outlive us
            stop_processes([child], grace_seconds=0)
            raise
    return exit_status(child)
