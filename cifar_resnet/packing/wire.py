"""What a trainer and a run's process say to each other: JSON lines over a Unix stream socket.

    run -> trainer   {"train": {"folder", "run_id", "config", "cwd"}}, then at most one {"stop": signal number}
    trainer -> run   {"started": facts, "trains": how}, {"epoch": record} per epoch, and last
                     {"ended": {"status", "kind", "error"}} or, before it starts, {"refused": reason}

`folder` is the run's folder as its process built it (absolute: the trainer writes the run's files there), `cwd` the
run's working directory (where a relative `data_dir` is found). `how` says how the run trains in the trainer (on
streams, or fused: its slot and the runs beside it), for the run's own log.
An end is a `MemberEnd`'s wire form (`ends.py`): its status and kind decide the run's exit status.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


class LineReader:
    """JSON messages, one per line, from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def read(self) -> list[dict[str, Any]] | None:
        """The messages that have arrived (waiting at most the socket's timeout); None once the peer has gone, or
        has sent what is not a message."""
        try:
            chunk = self.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError:  # reset by a peer that died
            return None
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        try:
            messages = [json.loads(line) for line in lines if line.strip()]
        except ValueError as error:  # not a peer of ours, or a broken one: not a reason to end this process
            log.warning("a malformed message on the socket (%s): the connection is dropped", error)
            return None
        if not all(isinstance(message, dict) for message in messages):
            log.warning("a message on the socket that is not a JSON object: the connection is dropped")
            return None
        return messages
