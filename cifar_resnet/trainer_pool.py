"""The trainers a supervisor (`cifar-resnet sweep --pack`, `cifar-resnet agent --pack`) starts: one
`cifar-resnet trainer` process per GPU slot, for the runs sharing it (see trainer.py)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .children import child_environment, exit_status, start_process, stop_processes
from .run_contract import TRAINER_VARIABLE

log = logging.getLogger(__name__)

TRAINER_STOP_SECONDS = 60.0  # a stopped trainer ends its runs (each writes its record); after this it is killed


class Trainers:
    """One `cifar-resnet trainer` per device slot (a GPU's CUDA_VISIBLE_DEVICES value, or None for the machine's
    default device), started on entering and stopped on leaving (SIGTERM: each run it holds ends as preempted,
    resumable from its last.pt). A run pinned to a slot hands its training to that slot's trainer through the
    variables `environment(slot)` gives it. Each trainer logs to `log_folder/trainer-<slot>.log`, or, without a
    folder, to this process's stderr."""

    def __init__(self, slots: Sequence[str | None], log_folder: Path | None = None) -> None:
        self.slots = list(dict.fromkeys(slots))
        self.log_folder = log_folder
        self.processes: dict[str | None, subprocess.Popen] = {}
        self.sockets: Path | None = None  # a short folder: a socket's path holds at most 107 bytes

    def socket(self, slot: str | None) -> Path:
        assert self.sockets is not None, "Trainers used outside its `with` block"
        return self.sockets / f"trainer-{slot if slot is not None else 'default'}.sock"

    def environment(self, slot: str | None) -> dict[str, str]:
        return {TRAINER_VARIABLE: str(self.socket(slot))}

    def start(self, slot: str | None) -> None:
        pinned = {} if slot is None else {"CUDA_VISIBLE_DEVICES": slot}
        # A trainer holds every run of its slot: it gets the slot's share of the cores, as one run would alone.
        env = child_environment(len(self.slots), **pinned)
        argv = [sys.executable, "-m", "cifar_resnet", "trainer", f"--socket={self.socket(slot)}"]
        if self.log_folder is None:
            self.processes[slot] = start_process(argv, env)
            return
        self.log_folder.mkdir(parents=True, exist_ok=True)
        name = f"trainer-{slot if slot is not None else 'default'}.log"
        with open(self.log_folder / name, "ab") as log_file:  # the child keeps its own copy of the descriptor
            self.processes[slot] = start_process(argv, env, log_file)

    def revive(self) -> None:
        """Start again every trainer that has ended (killed, crashed). Its runs have ended as preempted, and
        resume from their last.pt in the new one."""
        for slot in [slot for slot, process in self.processes.items() if process.poll() is not None]:
            log.warning("the trainer of %s ended (status %d); starting another",
                        f"GPU {slot}" if slot is not None else "this machine", exit_status(self.processes[slot]))
            self.start(slot)

    def __enter__(self) -> Trainers:
        self.sockets = Path(tempfile.mkdtemp(prefix="cifar-resnet-"))
        for slot in self.slots:
            self.start(slot)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes(list(self.processes.values()), TRAINER_STOP_SECONDS)
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
