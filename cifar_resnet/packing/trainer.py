"""One trainer per GPU (`cifar-resnet trainer`): the runs on that GPU hand it their training, and it trains them
together as one pack.

W&B's agent (or the offline sweep) starts every run as a process of its own, `python -m cifar_resnet.train`, and
that stays so: each run keeps its own W&B run, config, history, model artifact, signals and exit status. But
processes time-slice a GPU, so K runs in K processes train no faster together than one alone. When the variable
`CIFAR_RESNET_TRAINER` names a trainer's socket, a run's process hands its training to that trainer instead
(`client.py`, over `wire.py`'s messages). The trainer trains every run handed to it as a member of one pack
(`pack.Pack`: in lockstep), with CUDA started once and each data source on the device once, and writes each run's
files (`runner.run_steps`: best.pt, last.pt, record.json, progress.json in the run's folder). The run's process
relays its member's epochs to W&B and its signals to the trainer.

How its members share the GPU (`--pack`): `streams`, each on a CUDA stream of its own; `fused`, runs of one shape
as one fused model (`fused.py`), K slots to a group, K being the runs its supervisor plans for the GPU (`--runs`),
and what cannot be fused on streams beside it (`groups.py`, one log line saying why). Its log and each run's own
log say how each run trains.

A run whose trainer cannot be reached, or refuses it (it asks for another device), trains in its own process as
before. A run whose trainer dies mid-run ends as preempted, and resumes from its last.pt (or as finished, when its
record says so: nothing finished is trained again).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import socket
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.images import DataSource
from ..data.sources import load_source, source_key, split
from ..engine.device import select_device
from ..engine.loop import Interrupted
from ..errors import UserError, reject_unknown_arguments
from ..records import RunFolder
from ..runner import RunHooks, run_steps
from ..signals import SUPERVISOR_STOP_SIGNALS, stop_on_signals
from .ends import CRASH, MemberEnd
from .groups import ON_STREAMS, FusedGroups, Placement
from .pack import DEVICE_ERRORS, Pack
from .pool import FUSED, OFF, STREAMS, pack_mode
from .wire import LineReader, send

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.5  # how long an idle trainer waits for a run before it checks its own signals
# A run's process that takes nothing from its socket for this long (once the socket's buffer is full) is taken for
# gone: every member's step waits on a send to it.
SEND_TIMEOUT_SECONDS = 10.0


@dataclass
class Client:
    """A run's process, connected: its member in the pack is named by the connection's number."""

    sock: socket.socket
    name: str
    reader: LineReader = field(init=False)
    run_id: str | None = None
    stop: bool = False  # asked to stop (a signal to the run), or gone
    gone: bool = False  # a send to it failed: nothing more is sent

    def __post_init__(self) -> None:
        self.reader = LineReader(self.sock)

    def tell(self, message: dict[str, Any]) -> None:
        """Send, unless the run's process has gone, or takes nothing (SEND_TIMEOUT_SECONDS): then its member stops
        at its next step."""
        if self.gone:
            return
        try:
            send(self.sock, message)
        except OSError:  # TimeoutError included
            self.gone = self.stop = True


class Trainer:
    """Serves runs on `socket_path`, training them as one pack on `device`, until a stop signal; then every member
    still training ends as preempted, as a run does when stopped. `mode`: how the members share the device
    (`pool.STREAMS` or `pool.FUSED`); `runs`: the runs its supervisor plans for the device, the slots of a fused
    group; `parent`: its supervisor's pid (once that process has gone and no run is left, it ends), by default the
    process that started it."""

    def __init__(self, socket_path: Path, device: torch.device, mode: str = STREAMS, runs: int = 1,
                 parent: int | None = None) -> None:
        self.device = device
        self.parent = parent if parent is not None else os.getppid()
        self.pack = Pack(device)  # its `streams` are every stream of this process: members', graphs', groups'
        self.groups = FusedGroups(device, runs, self.pack.streams) if mode == FUSED else None
        self.sources: dict[tuple, DataSource] = {}  # loaded data, on the device, by `source_key`
        self.source_keys: dict[str, tuple] = {}  # the pack's members' sources, by member name
        self.clients: dict[str, Client] = {}
        self.run_ids: dict[str, str] = {}  # the pack's members' run ids, by member name
        self.selector = selectors.DefaultSelector()
        socket_path.unlink(missing_ok=True)  # a trainer killed before it could remove its socket
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen()
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.socket_path, self.connections = socket_path, 0
        self.mode, self.runs = mode, runs

    def serve(self, received: Sequence[int]) -> None:
        log.info("trainer on %s, serving %s (members %s%s)", self.device, self.socket_path, self.mode,
                 f", {self.runs} slots to a fused group" if self.groups is not None else "")
        with contextlib.ExitStack() as leaving:  # each step of the way out runs, whichever fails
            leaving.callback(self.socket_path.unlink, missing_ok=True)
            leaving.callback(self.listener.close)
            leaving.callback(self.selector.close)
            if self.groups is not None:
                leaving.callback(self.groups.close)
            leaving.callback(self.stop_members)
            # Ends on a stop signal, or once its supervisor has gone and no run is left to train.
            while not received and (self.pack or os.getppid() == self.parent):
                self.poll(0.0 if self.pack else IDLE_SECONDS)  # sync-free: a syscall per round, no device read
                for name, end in self.pack.step().items():
                    self.end(name, end)

    def stop_members(self) -> None:
        """Stop every member; each one's run records it preempted: last.pt holds its last epoch. One that cannot
        be stopped cleanly (its checkpoint cannot be written) is logged, and its run told all the same."""
        for name in self.pack.names():
            try:
                self.pack.stop(name)
            except Exception:
                log.exception("run %s: its training did not stop cleanly", self.run_ids.get(name, name))
            self.end(name, MemberEnd(error=Interrupted()))

    def poll(self, timeout: float) -> None:
        """Accept runs' connections and read their messages."""
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                sock, _ = self.listener.accept()
                sock.settimeout(SEND_TIMEOUT_SECONDS)  # a send to a run that reads nothing must not hold the pack
                self.connections += 1
                client = Client(sock, f"connection-{self.connections}")
                self.clients[client.name] = client
                self.selector.register(sock, selectors.EVENT_READ, client)
                continue
            client = key.data
            messages = client.reader.read()
            if messages is None:  # its process has gone (or said what no run says): its member stops at its next step
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
        """Add the run to the pack, or tell it why not: refused (it asks for another device), or ended at once (a
        user error; any other error, a crash, which leaves the trainer and its other runs as they were)."""
        try:
            self.add(client, request)
        except DEVICE_ERRORS:
            raise
        except Exception as error:
            if not isinstance(error, UserError):
                log.exception("run %s crashed as it joined the pack", client.run_id)
            if self.groups is not None and client.run_id is not None:
                self.groups.release(client.run_id)
            client.tell({"ended": MemberEnd(error=error).to_wire()})
            self.drop(client)

    def add(self, client: Client, request: dict[str, Any]) -> None:
        """`admit`'s work: the run's data, its place (in a fused group, or on streams), its member."""
        config = Config.from_mapping(request["config"])
        folder = RunFolder(Path(request["folder"]), request["run_id"])  # built by the run's process, absolute
        client.run_id = folder.run_id
        if canonical(select_device(config.device)) != canonical(self.device):
            client.tell({"refused": f"it asks for device {config.device}, this trainer trains on {self.device}"})
            return self.drop(client)
        key, source = self.source(config, Path(request["cwd"]))
        data = split(source, config)
        placement = self.place(client.run_id, config, len(data.classes))
        members = len(self.pack) + 1
        how = f"in the trainer on {self.device} ({members} member{'' if members == 1 else 's'}), {placement.how}"
        hooks = RunHooks(on_start=lambda facts: client.tell({"started": facts, "trains": how}),
                         on_epoch_recorded=lambda record: client.tell({"epoch": asdict(record)}),
                         should_stop=lambda: client.stop)
        log.info("run %s joins the pack (%d member%s): %s", client.run_id, members, "" if members == 1 else "s",
                 placement.how)
        self.pack.add(client.name, run_steps(config, folder, data, self.device, hooks, join=placement.join,
                                             streams=self.pack.streams))
        self.run_ids[client.name], self.source_keys[client.name] = client.run_id, key

    def place(self, run_id: str, config: Config, num_classes: int) -> Placement:
        return ON_STREAMS if self.groups is None else self.groups.place(run_id, config, num_classes)

    def source(self, config: Config, cwd: Path) -> tuple[tuple, DataSource]:
        """The run's data source on the device (and its `source_key`), loaded once for every run of the same
        source. Loading another, it first frees those no member trains on (a sweep's runs, one after another on
        one source, keep it)."""
        if not Path(config.data_dir).is_absolute():
            config = config.replace(data_dir=str(cwd / config.data_dir))
        key = source_key(config)
        if key not in self.sources:
            for unused in self.sources.keys() - set(self.source_keys.values()):
                del self.sources[unused]
            self.sources[key] = load_source(config).to(self.device)
        return key, self.sources[key]

    def end(self, name: str, end: MemberEnd) -> None:
        """The member `name` has left the pack: free its slot, tell its run how it ended."""
        client = self.clients.get(name)
        run_id = self.run_ids.pop(name, name)
        self.source_keys.pop(name, None)
        if self.groups is not None:
            self.groups.release(run_id)
        if end.kind == CRASH:
            log.error("run %s crashed:\n%s", run_id, "".join(traceback.format_exception(end.error)))
        if client is not None:
            client.tell({"ended": end.to_wire()})
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


def serve(socket_path: Path, device_name: str, mode: str = STREAMS, runs: int = 1, parent: int | None = None) -> int:
    """Run a trainer until it is stopped; its exit status."""
    device = select_device(device_name)
    if device.type == "cuda":
        torch.cuda.init()  # CUDA starts now, while the runs' processes start
    with stop_on_signals(SUPERVISOR_STOP_SIGNALS) as received:
        Trainer(socket_path, device, mode, runs, parent).serve(received)
    return 0


def trainer_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("trainer", rest)
    if pack_mode(args.pack) == OFF:
        raise UserError(f"--pack: {args.pack!r} is not one of {STREAMS}, {FUSED}")
    if args.runs < 1:
        raise UserError(f"--runs: must be >= 1, got {args.runs}")
    return serve(Path(args.socket), args.device, args.pack, args.runs, args.parent_pid)
