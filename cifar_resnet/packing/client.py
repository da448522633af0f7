"""A run's side of its trainer (`packing.trainer`): the run's process hands its training to the trainer whose socket
`CIFAR_RESNET_TRAINER` names, then relays its member's life (its start, epochs and end) to W&B and to its own log,
and its signals to the trainer. A run whose trainer cannot be reached, or refuses it, trains in its own process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import Config
from ..engine.loop import Interrupted
from ..records import BEST_EPOCH, TEST_ACC, TEST_LOSS, RunFolder, RunRecord, describe_epoch, describe_test, read_record
from ..runner import RunHooks
from .ends import MemberEnd
from .wire import LineReader, send

log = logging.getLogger(__name__)

CONNECT_WAIT_SECONDS = 60.0  # a run waits this long for its trainer's socket (the trainer starts beside the runs)
CONNECT_RETRY_SECONDS = 0.2
POLL_SECONDS = 0.2  # how often a run's process checks for signals while its member trains


def connect(socket_path: Path, wait_seconds: float = CONNECT_WAIT_SECONDS) -> socket.socket | None:
    """A connection to the trainer at `socket_path`, waiting for it to start; None if none answers in time."""
    deadline = time.monotonic() + wait_seconds
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(socket_path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                return None
            time.sleep(CONNECT_RETRY_SECONDS)


def run_in_trainer(socket_path: Path, config: Config, folder: RunFolder, hooks: RunHooks,
                   received: Sequence[int]) -> RunRecord | None:
    """Hand this run's training to the trainer at `socket_path` and relay its member's life to `hooks`; the run's
    record once it has finished. None when the trainer cannot take it: the caller trains it in this process.
    Raises as `run_training` would: UserError, Interrupted (stopped: by a signal in `received`, which is passed on,
    or with its trainer), RunFailed (the trainer's one line for a failure not of the user's making)."""
    sock = connect(socket_path)
    if sock is None:
        log.warning("no trainer answers on %s: training in this process", socket_path)
        return None
    with sock:
        if hooks.fetch_resume is not None and not folder.last.exists():
            hooks.fetch_resume(folder.last)
        send(sock, {"train": {"folder": str(folder.path.absolute()), "run_id": folder.run_id,
                              "config": config.to_dict(), "cwd": os.getcwd()}})
        sock.settimeout(POLL_SECONDS)
        reader, stop_sent = LineReader(sock), False
        while True:
            if received and not stop_sent:
                send(sock, {"stop": received[0]})
                stop_sent = True
            messages = reader.read()
            if messages is None:  # the trainer died: what the run's files say is what happened
                record = read_record(folder.path)
                if record is not None and record.status == "finished":
                    return logged_test(record)
                raise Interrupted("its trainer ended")
            for message in messages:
                if "refused" in message:
                    log.warning("the trainer on %s cannot take this run (%s): training in this process",
                                socket_path, message["refused"])
                    return None
                if "started" in message:
                    log.info("config: %s", config.to_dict())  # this run's log holds what a run alone's holds
                    log.info("trains %s", message["trains"])  # how: on streams, or fused with whom
                    if hooks.on_start is not None:
                        hooks.on_start(message["started"])
                elif "epoch" in message:
                    record = RunRecord(**message["epoch"])
                    log.info("%s", describe_epoch(record.history, config.epochs))
                    if hooks.on_epoch_recorded is not None:
                        hooks.on_epoch_recorded(record)
                elif "ended" in message:
                    return logged_test(MemberEnd.from_wire(message["ended"]).record_or_raise(folder))


def logged_test(record: RunRecord) -> RunRecord:
    """A finished run's record, after logging its test line (the trainer's log has it too, among other runs')."""
    summary = record.summary
    log.info("%s", describe_test(summary[BEST_EPOCH], summary[TEST_LOSS], summary[TEST_ACC]))
    return record
