"""The package's log lines (logs.py): each on a line of its own above a live display, on a real terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

from helpers.sweeps import tiny_settings, write_sweep

ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_a_terminal(argv: list[str], ready: str, timeout: float = 120.0) -> str:
    """Run `argv` on a pseudo-terminal (80 x 24), send it SIGINT once its output shows `ready`, and return what it
    wrote, as a terminal got it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env={**os.environ,
                                                                                          "TERM": "xterm"})
    os.close(follower)
    shown = bytearray()

    def read() -> None:  # drained all along, so that the process never blocks on a full terminal
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while ready.encode() not in shown:
            assert process.poll() is None and time.monotonic() < deadline, shown.decode(errors="replace")[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=timeout)
        reader.join(timeout=10)
    finally:
        process.kill()
        os.close(leader)
    return shown.decode(errors="replace")


def test_a_log_line_during_the_live_table_prints_on_a_line_of_its_own(tmp_path, tiny_config):
    """Ctrl-C under the live table: `INFO: stopped by signal 2` starts a line; it was printed onto the bar's."""
    path = write_sweep(tmp_path / "one.yaml", tiny_settings(tiny_config, epochs=20))

    shown = on_a_terminal([sys.executable, "-m", "cifar_resnet", "sweep", str(path), "--offline"], ready="runs 0/1")

    lines = re.split(r"[\r\n]", ANSI_CONTROL.sub("", shown))
    (stopped,) = [line for line in lines if "stopped by signal 2" in line]
    assert stopped == "INFO: stopped by signal 2", shown[-3000:]
