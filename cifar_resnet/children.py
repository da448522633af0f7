"""A child process of a tool (a run, an agent, a trainer): its environment, its start in a session of its own, its
stop, and its exit status as a shell reports it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from .run_contract import SIGNAL_EXIT_BASE
from .threads import cpu_threads_per_run

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds `cifar_resnet/`


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
