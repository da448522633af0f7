"""What tests of whole runs share: a command in a process or in this one, a run's error lines, the files of a folder,
and waiting on processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from cifar_resnet.cli import main as cli_main

WAIT_SECONDS = 120  # for a signal to take effect, or a process to get somewhere


def cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m cifar_resnet ARGS` in a fresh process, this worktree's package first on the path."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "cifar_resnet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def cli_in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`cifar-resnet ARGS` run in this process, its exit status and output given as `cli` gives a process's: for what
    a command says and returns, without the seconds a new Python takes to start. `cli` where the process is at stake
    (a signal, its exit status as the shell sees it)."""
    capsys.readouterr()  # what was printed before
    status = cli_main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["cifar-resnet", *args], status, out, err)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR")]


def one_error_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The run's one ERROR line, after checking its exit status and that no traceback was printed."""
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = error_lines(done.stderr)
    return line


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (links not followed) and its bytes: to prove nothing was lost."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.is_symlink()}


def processes_of(marker: str) -> list[int]:
    """Processes (any descendant, W&B's service included) whose environment mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for(condition, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
