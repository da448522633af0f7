"""Stop signals: which signals stop a run or a tool, how they are held while a process saves its state, and how
a process ends without a late signal changing its exit status."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

# What a run treats as "save your state and stop": SIGTERM (spot preemption, `docker stop`, schedulers) and SIGUSR1
# (Slurm's and others' early warning).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Stop a tool that supervises children; passed on to them. SIGUSR1 is a batch scheduler's warning (Slurm's
# `--signal=B:USR1@N`, ahead of a time limit).
SUPERVISOR_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# What a supervisor passes on instead: W&B's agent forwards SIGUSR1 to its run but then takes the next run, while
# SIGTERM stops both the run (which saves its state) and the agent.
FORWARDED_AS = {signal.SIGUSR1: signal.SIGTERM}


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
