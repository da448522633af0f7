"""One trainer per GPU: the runs on that GPU hand it their training, and it trains them together as one pack.

W&B's agent (or the offline sweep) starts every run as a process of its own, `python -m cifar_resnet.train`, and
that stays so: each run keeps its own W&B run, config, history, model artifact, signals and exit status. But
processes time-slice a GPU, so K runs in K processes train no faster together than one alone. When the variable
`CIFAR_RESNET_TRAINER` names a trainer's socket, a run's process hands its training to that trainer instead. The
trainer trains every run handed to it as a member of one pack (`pack.Pack`: in lockstep, each on a CUDA stream of
its own), with CUDA started once and each data source on the device once, and writes each run's files
(`runner.run_steps`: best.pt, last.pt, record.json, progress.json in the run's folder). The run's process relays
its member's epochs to W&B and its signals to the trainer.

The protocol is JSON lines over a Unix stream socket:
    run -> trainer   {"train": {"run_id", "config", "cwd"}}, then at most one {"stop": signal number}
    trainer -> run   {"started": facts}, {"epoch": record} per epoch, and last {"ended": {"status", "kind", "error"}}
                     or, before it starts, {"refused": reason}

A run whose trainer cannot be reached, or refuses it (it asks for another device), trains in its own process as
before. A run whose trainer dies mid-run ends as preempted, and resumes from its last.pt (or as finished, when its
record says so: nothing finished is trained again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import selectors
import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import RESUME_CHECKPOINT
from .config import Config
from .data.images import DataSource
from .data.sources import load_source, source_key, split
from .engine.device import select_device
from .engine.loop import Interrupted
from .errors import RunFailed, StorageError, TrainingDiverged, UserError
from .pack import Ended, Pack
from .process import SUPERVISOR_STOP_SIGNALS, reject_unknown_arguments, stop_on_signals
from .records import BEST_EPOCH, TEST_ACC, TEST_LOSS, RunRecord, describe_epoch, describe_test, read_record
from .run_contract import run_folder
from .runner import AlreadyFinished, RunHooks, run_steps

log = logging.getLogger(__name__)

CONNECT_WAIT_SECONDS = 60.0  # a run waits this long for its trainer's socket (the trainer starts beside the runs)
CONNECT_RETRY_SECONDS = 0.2
POLL_SECONDS = 0.2  # how often a run's process checks for signals while its member trains
IDLE_SECONDS = 0.5  # how long an idle trainer waits for a run before it checks its own signals
# How a member's end reaches its run: the kind decides the run's exit status (see train.py).
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
USER, MACHINE, CRASH, DONE_BEFORE = "user", "machine", "crash", "done-before"


# --- the wire ------------------------------------------------------------------------------------------------


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


class LineReader:
    """JSON messages, one per line, from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def read(self) -> list[dict[str, Any]] | None:
        """The messages that have arrived (waiting at most the socket's timeout); None once the peer has gone."""
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
        return [json.loads(line) for line in lines if line.strip()]


# --- the trainer -------------------------------------------------------------------------------------------------


@dataclass
class Client:
    """A run's process, connected: its member in the pack is named by the connection's number."""

    sock: socket.socket
    name: str
    reader: LineReader = field(init=False)
    run_id: str | None = None
    stop: bool = False  # asked to stop (a signal to the run), or gone

    def __post_init__(self) -> None:
        self.reader = LineReader(self.sock)

    def tell(self, message: dict[str, Any]) -> None:
        """Send, unless the run's process has gone (then its member stops at its next step)."""
        try:
            send(self.sock, message)
        except OSError:
            self.stop = True


def ending(error: BaseException | None) -> dict[str, Any]:
    """How a member ended, as its run is told."""
    if error is None:
        return {"status": FINISHED}
    if isinstance(error, (Interrupted, GeneratorExit)):
        return {"status": STOPPED}
    if isinstance(error, AlreadyFinished):  # finished in an earlier attempt: nothing trained now
        return {"status": FAILED, "kind": DONE_BEFORE, "error": str(error)}
    kind = USER if isinstance(error, UserError) else MACHINE if isinstance(error, (TrainingDiverged, StorageError)) \
        else CRASH
    message = f"{type(error).__name__}: {error}" if kind == CRASH else str(error)
    return {"status": FAILED, "kind": kind, "error": message}


class Trainer:
    """Serves runs on `socket_path`, training them as one pack on `device`, until a stop signal; then every member
    still training ends as preempted, as a run does when stopped."""

    def __init__(self, socket_path: Path, device: torch.device) -> None:
        self.device = device
        self.pack = Pack(device)
        self.sources: dict[tuple, DataSource] = {}  # loaded data, on the device, by `source_key`
        self.clients: dict[str, Client] = {}
        self.selector = selectors.DefaultSelector()
        socket_path.unlink(missing_ok=True)  # a trainer killed before it could remove its socket
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen()
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.socket_path, self.connections = socket_path, 0

    def serve(self, received: Sequence[int]) -> None:
        parent = os.getppid()
        log.info("trainer on %s, serving %s", self.device, self.socket_path)
        try:
            # Ends on a stop signal, or once its supervisor has gone and no run is left to train.
            while not received and (self.pack or os.getppid() == parent):
                self.poll(0.0 if self.pack else IDLE_SECONDS)  # sync-free: a syscall per round, no device read
                for end in self.pack.step():
                    self.end(end.name, end.error)
        finally:
            for name in self.pack.names():
                self.pack.stop(name)  # its run records it preempted: last.pt holds its last epoch
                self.end(name, Interrupted())
            self.selector.close()
            self.listener.close()
            self.socket_path.unlink(missing_ok=True)

    def poll(self, timeout: float) -> None:
        """Accept runs' connections and read their messages."""
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                sock, _ = self.listener.accept()
                self.connections += 1
                client = Client(sock, f"connection-{self.connections}")
                self.clients[client.name] = client
                self.selector.register(sock, selectors.EVENT_READ, client)
                continue
            client = key.data
            messages = client.reader.read()
            if messages is None:  # its process has gone: its member stops at its next step
                self.selector.unregister(client.sock)
                client.stop = True
                if client.name not in self.pack.names():
                    self.drop(client)
                continue
            for message in messages:
                if "train" in message and client.run_id is None:
                    self.admit(client, message["train"])
                elif "stop" in message:
                    log.info("run %s: stopped by its process (signal %s)", client.run_id, message["stop"])
                    client.stop = True

    def admit(self, client: Client, request: dict[str, Any]) -> None:
        """Add the run to the pack, or tell it why not."""
        try:
            config = Config.from_mapping(request["config"])
            client.run_id = request["run_id"]
            if canonical(select_device(config.device)) != canonical(self.device):
                client.tell({"refused": f"it asks for device {config.device}, this trainer trains on {self.device}"})
                return self.drop(client)
            cwd = Path(request["cwd"])
            data = split(self.source(config, cwd), config)
        except UserError as error:
            client.tell({"ended": ending(error)})
            return self.drop(client)
        hooks = RunHooks(on_start=lambda facts: client.tell({"started": facts}),
                         on_epoch=lambda record: client.tell({"epoch": asdict(record)}),
                         should_stop=lambda: client.stop)
        run_dir = cwd / run_folder(config.output_dir, client.run_id)
        members = len(self.pack) + 1
        log.info("run %s joins the pack (%d member%s)", client.run_id, members, "" if members == 1 else "s")
        self.pack.add(client.name, run_steps(config, client.run_id, data, self.device, hooks, run_dir=run_dir))

    def source(self, config: Config, cwd: Path) -> DataSource:
        """The run's data source on the device, loaded once for every run of the same source."""
        if not Path(config.data_dir).is_absolute():
            config = config.replace(data_dir=str(cwd / config.data_dir))
        key = source_key(config)
        if key not in self.sources:
            self.sources[key] = load_source(config).to(self.device)
        return self.sources[key]

    def end(self, name: str, error: BaseException | None) -> None:
        client = self.clients.get(name)
        if isinstance(error, Exception) and ending(error).get("kind") == CRASH:
            log.error("run %s crashed:\n%s", client.run_id if client else name,
                      "".join(traceback.format_exception(error)))
        if client is not None:
            client.tell({"ended": ending(error)})
            self.drop(client)

    def drop(self, client: Client) -> None:
        with contextlib.suppress(KeyError, ValueError):  # unregistered already when its process went first
            self.selector.unregister(client.sock)
        client.sock.close()
        self.clients.pop(client.name, None)


def canonical(device: torch.device) -> torch.device:
    """`cuda` and `cuda:<current>` are one device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def serve(socket_path: Path, device_name: str) -> int:
    """Run a trainer until it is stopped; its exit status."""
    device = select_device(device_name)
    if device.type == "cuda":
        torch.cuda.init()  # CUDA starts now, while the runs' processes start
    with stop_on_signals(SUPERVISOR_STOP_SIGNALS) as received:
        Trainer(socket_path, device).serve(received)
    return 0


def trainer_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("trainer", rest)
    return serve(Path(args.socket), args.device)


# --- a run's side -------------------------------------------------------------------------------------------------


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


def train_in_trainer(socket_path: Path, config: Config, run_id: str, hooks: RunHooks,
                     received: Sequence[int]) -> RunRecord | None:
    """Hand this run's training to the trainer at `socket_path` and relay its member's life to `hooks`; the run's
    record once it has finished. None when the trainer cannot take it: the caller trains it in this process.
    Raises as `run_training` would: UserError, Interrupted (stopped: by a signal in `received`, which is passed on,
    or with its trainer), RunFailed (the trainer's one line for a failure not of the user's making)."""
    sock = connect(socket_path)
    if sock is None:
        log.warning("no trainer answers on %s: training in this process", socket_path)
        return None
    run_dir = run_folder(config.output_dir, run_id)
    with sock:
        if hooks.fetch_resume is not None and not (run_dir / RESUME_CHECKPOINT).exists():
            hooks.fetch_resume(run_dir / RESUME_CHECKPOINT)
        send(sock, {"train": {"run_id": run_id, "config": config.to_dict(), "cwd": os.getcwd()}})
        sock.settimeout(POLL_SECONDS)
        reader, stop_sent = LineReader(sock), False
        while True:
            if received and not stop_sent:
                send(sock, {"stop": received[0]})
                stop_sent = True
            messages = reader.read()
            if messages is None:  # the trainer died: what the run's files say is what happened
                record = read_record(run_dir)
                if record is not None and record.status == FINISHED:
                    return logged_test(record)
                raise Interrupted("its trainer ended")
            for message in messages:
                if "refused" in message:
                    log.warning("the trainer on %s cannot take this run (%s): training in this process",
                                socket_path, message["refused"])
                    return None
                if "started" in message:
                    log.info("config: %s", config.to_dict())  # this run's log holds what a run alone's holds
                    if hooks.on_start is not None:
                        hooks.on_start(message["started"])
                elif "epoch" in message:
                    record = RunRecord(**message["epoch"])
                    log.info("%s", describe_epoch(record.history, config.epochs))
                    if hooks.on_epoch is not None:
                        hooks.on_epoch(record)
                elif "ended" in message:
                    return logged_test(ended(message["ended"], run_dir))


def logged_test(record: RunRecord) -> RunRecord:
    """A finished run's record, after logging its test line (the trainer's log has it too, among other runs')."""
    summary = record.summary
    log.info("%s", describe_test(summary[BEST_EPOCH], summary[TEST_LOSS], summary[TEST_ACC]))
    return record


def ended(end: dict[str, Any], run_dir: Path) -> RunRecord:
    if end["status"] == FINISHED:
        return RunRecord.load(run_dir)
    if end["status"] == STOPPED:
        raise Interrupted("stopped in its trainer")
    if end["kind"] == DONE_BEFORE:
        raise AlreadyFinished(end["error"])
    if end["kind"] == USER:
        raise UserError(end["error"])
    raise RunFailed(end["error"])
