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


def connect(socket_path: Path, received: Sequence[int] = (),
            wait_seconds: float = CONNECT_WAIT_SECONDS) -> socket.socket | None:
    """A connection to the trainer at `socket_path`, waiting for it to start; None if none answers in time, or once
    a signal has arrived in `received` (the run must stop within its supervisor's grace)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(socket_path))
            return sock
        except OSError:
            sock.close()
            if received or time.monotonic() >= deadline:
                return None
            time.sleep(CONNECT_RETRY_SECONDS)


def run_in_trainer(socket_path: Path, config: Config, folder: RunFolder, hooks: RunHooks,
                   received: Sequence[int]) -> RunRecord | None:
    """Hand this run's training to the trainer at `socket_path` and relay its member's life to `hooks`; the run's
    record once it has finished. None when the trainer cannot take it: the caller trains it in this process.
    Raises as `run_training` would: UserError, Interrupted (stopped: by a signal in `received`, which is passed on,
    or with its trainer), RunFailed (the trainer's one line for a failure not of the user's making)."""
    sock = connect(socket_path, received)
    if sock is None:
        if received:
            raise Interrupted("stopped while it waited for its trainer")
        log.warning("no trainer answers on %s: training in this process", socket_path)
        return None
    with sock:
        if hooks.fetch_resume is not None:
            # Under the folder's lock, as the runner fetches: never over the last.pt of an attempt that another
            # process is training (its refusals are the runner's: another process's run, a finished one).
            with folder.claim(config):
                if not folder.last.exists() and hooks.fetch_resume(folder.last):
                    log.info("fetched the resume checkpoint of run %s into %s", folder.run_id, folder.last)
        if not sent(sock, {"train": {"folder": str(folder.path.absolute()), "run_id": folder.run_id,
                                     "config": config.to_dict(), "cwd": os.getcwd()}}):
            return ended_with_trainer(folder)
        sock.settimeout(POLL_SECONDS)
        reader, stop_sent = LineReader(sock), False
        while True:
            if received and not stop_sent:
                stop_sent = True
                if not sent(sock, {"stop": received[0]}):
                    return ended_with_trainer(folder)
            messages = reader.read()
            if messages is None:
                return ended_with_trainer(folder)
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


def sent(sock: socket.socket, message: dict) -> bool:
    """Send; False when the trainer has gone (a broken pipe: it died as this run was stopped, say)."""
    try:
        send(sock, message)
    except OSError:
        return False
    return True


def ended_with_trainer(folder: RunFolder) -> RunRecord:
    """The trainer died: what the run's files say is what happened (finished, or else stopped: it resumes)."""
    record = read_record(folder.path)
    if record is not None and record.status == "finished":
        return logged_test(record)
    raise Interrupted("its trainer ended")


def logged_test(record: RunRecord) -> RunRecord:
    """A finished run's record, after logging its test line (the trainer's log has it too, among other runs')."""
    summary = record.summary
    log.info("%s", describe_test(summary[BEST_EPOCH], summary[TEST_LOSS], summary[TEST_ACC]))
    return record
