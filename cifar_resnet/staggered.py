"""Children started a few seconds apart (W&B agents, one per GPU slot, or runs at once), with the stop signals this
process receives forwarded to them, and their exit statuses gathered.

Staggered so that they do not all call W&B and load their data at once (wandb_sweep.DEFAULT_STAGGER_SECONDS).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .children import exit_status, start_process, stop_processes
from .signals import FORWARDED_AS, SUPERVISOR_STOP_SIGNALS, stop_on_signals
from .threads import cpu_threads_per_run

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often a supervisor forwards signals and checks its children
STOP_SECONDS = 30.0  # a child stopped on SIGTERM lets its run save its resume checkpoint; after this it is killed


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    gpu: str | None  # the CUDA_VISIBLE_DEVICES value it is pinned to; None: not pinned
    env: Mapping[str, str] = field(default_factory=dict)  # more variables for it (its GPU's trainer)


def first_failure(statuses: Sequence[int], what: str) -> int:
    """0 when every child succeeded, else the first failure's exit status; each failure is logged."""
    for number, status in enumerate(statuses, start=1):
        if status:
            log.error("%s %d exited with status %d", what, number, status)
    return next((status for status in statuses if status), 0)


def run_staggered_statuses(
    launches: Sequence[Launch], stagger_seconds: float, what: str,
    start: Callable[[Sequence[str], Mapping[str, str]], subprocess.Popen] = start_process,
    tend: Callable[[], None] | None = None,
) -> list[int]:
    """Start each launch `stagger_seconds` after the last, forward SIGTERM, SIGINT and SIGUSR1 (as SIGTERM) to those
    running, and wait for all; every child's exit status, in order (128 + N for signal N; `first_failure` picks the
    command's). `what` names the children in log lines ("agent"). `start(argv, env)` starts one; where it raises,
    the children started already are stopped, and the error raised. `tend()`, when given, runs at every check of
    the children (the agents' trainers started again)."""
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
                if tend is not None:
                    tend()
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
            try:
                children.append(start(launch.argv, {**threads, **os.environ, **pinned, **launch.env}))
            except BaseException:
                stop_processes(children, STOP_SECONDS)  # none left running without its supervisor
                raise
            log.info("%s %d of %d started (pid %d) on %s", what, index + 1, len(launches), children[-1].pid,
                     f"GPU {launch.gpu}" if launch.gpu is not None else "no GPU")
        while any(child.poll() is None for child in children):
            pause(POLL_SECONDS)

    return [exit_status(child) for child in children]
