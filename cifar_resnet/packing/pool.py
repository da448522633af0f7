"""The trainers of a supervisor (`cifar-resnet sweep`, `cifar-resnet agent`): one `cifar-resnet trainer` per GPU
for the runs sharing it, and how they share it (`--pack MODE`). Light: no torch here, so that the tools' command
lines stay quick.

Modes: `streams`, every run on a CUDA stream of its own in its GPU's trainer; `fused`, runs of one shape as one fused
model (K slots to a group, K the runs planned per GPU), the others on streams beside it; `off`, each run in its own
process, as W&B's agent starts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..children import child_environment, exit_status, start_process, stop_processes
from ..errors import UserError
from ..run_contract import TRAINER_VARIABLE

log = logging.getLogger(__name__)

STREAMS, FUSED, OFF = "streams", "fused", "off"
PACK_MODES = (STREAMS, FUSED, OFF)
TRAINER_STOP_SECONDS = 60.0  # a stopped trainer ends its runs (each writes its record); after this it is killed
# CUDA's hardware queues per process (default 8): streams beyond them share queues, and their kernels serialise.
# A trainer holds up to 32 streams (`engine.streams`); 32 is also the most CUDA allows. Set before CUDA starts.
CUDA_CONNECTIONS = {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}
# A trainer that ends this soon after its start failed at start-up: it is started again after 1, 2, 4... seconds,
# and after MAX_QUICK_FAILURES in a row no more (its GPU's runs then train in their own processes).
QUICK_FAILURE_SECONDS = 60.0
FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_QUICK_FAILURES = 5


def add_pack_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """`--pack [MODE]` (a bare `--pack` is `streams`) and `--no-pack` (`off`), for a tool that starts runs;
    `default` says in the help what it does without them. `pack_mode` reads them."""
    parser.add_argument("--pack", nargs="?", const=STREAMS, default=None, metavar="MODE",
                        help=f"how the runs sharing a GPU train: {STREAMS} (one trainer process per GPU trains them "
                        f"together, each on a CUDA stream of its own; a bare --pack), {FUSED} (runs of one shape "
                        f"as one fused model in the trainer, K per model, K the runs per GPU; the others on "
                        f"streams), {OFF} (one process per run, which time-slice the GPU). Each run stays a W&B run "
                        f"of its own. Default: {default}")
    parser.add_argument("--no-pack", dest="pack", action="store_const", const=OFF, help=f"the same as --pack {OFF}")


def pack_mode(value: str | None) -> str | None:
    """The mode `--pack` asks for, checked; None when none is asked for. The default is the tools' own: `streams`
    when some GPU has more than one run, else `off` (unmeasured on a GPU so far, `fused` is never the default)."""
    if value is not None and value not in PACK_MODES:
        raise UserError(f"--pack: {value!r} is not one of {', '.join(PACK_MODES)}")
    return value


def trainer_name(gpu: str | None) -> str:
    """The stem of a GPU's trainer's socket and log file: `trainer-<gpu>`, its characters safe in a file name (an
    old-style MIG id, MIG-GPU-<uuid>/1/0, holds slashes)."""
    return "trainer-" + (re.sub(r"[^\w.-]", "_", gpu) if gpu is not None else "default")


class TrainerPool:
    """One `cifar-resnet trainer` per GPU (a CUDA_VISIBLE_DEVICES value, or None for the machine's default device),
    started on entering and stopped on leaving (SIGTERM: each run it holds ends as preempted, resumable from its
    last.pt). `gpus` lists one entry per run slot of the supervisor (a GPU as often as runs share it): a GPU's
    trainer is told how many (`--runs`, the slots of its fused groups). A run pinned to a GPU hands its training to
    that GPU's trainer through the variables `environment(gpu)` gives it. Each trainer logs to
    `log_folder/trainer-<gpu>.log`, or, without a folder, to this process's stderr. `revive` starts again a trainer
    that has ended, and gives up on a GPU whose trainer keeps failing at its start."""

    def __init__(self, gpus: Sequence[str | None], log_folder: Path | None = None, mode: str = STREAMS) -> None:
        self.runs = Counter(gpus)  # runs per GPU
        self.gpus = list(self.runs)
        self.log_folder, self.mode = log_folder, mode
        self.processes: dict[str | None, subprocess.Popen] = {}
        self.started_at: dict[str | None, float] = {}  # time.monotonic() of each trainer's start
        self.quick_failures: Counter[str | None] = Counter()  # in a row, per GPU
        self.restart_at: dict[str | None, float] = {}  # the ended trainers waiting to start again
        self.given_up: set[str | None] = set()  # the GPUs whose runs train in their own processes
        self.sockets: Path | None = None  # a short folder: a socket's path holds at most 107 bytes

    def socket(self, gpu: str | None) -> Path:
        assert self.sockets is not None, "TrainerPool used outside its `with` block"
        return self.sockets / f"{trainer_name(gpu)}.sock"

    def environment(self, gpu: str | None) -> dict[str, str]:
        """The variables of a run on `gpu`: its trainer's socket (none once its trainer was given up)."""
        return {} if gpu in self.given_up else {TRAINER_VARIABLE: str(self.socket(gpu))}

    def start(self, gpu: str | None) -> None:
        pinned = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        # A trainer holds every run of its GPU: it gets the GPU's share of the cores, as one run would alone.
        env = child_environment(len(self.gpus), **pinned, **CUDA_CONNECTIONS)
        argv = [sys.executable, "-m", "cifar_resnet", "trainer", f"--socket={self.socket(gpu)}",
                f"--parent-pid={os.getpid()}", f"--pack={self.mode}", f"--runs={self.runs[gpu]}"]
        self.started_at[gpu] = time.monotonic()
        if self.log_folder is None:
            self.processes[gpu] = start_process(argv, env)
            return
        self.log_folder.mkdir(parents=True, exist_ok=True)
        # The child keeps its own copy of the descriptor.
        with open(self.log_folder / f"{trainer_name(gpu)}.log", "ab") as log_file:
            self.processes[gpu] = start_process(argv, env, log_file)

    def revive(self) -> None:
        """Start again every trainer that has ended (killed, crashed): its runs have ended as preempted, and resume
        from their last.pt in the new one. One that ended soon after its start is started again later and later
        (1, 2, 4... s); after MAX_QUICK_FAILURES such ends in a row, no more: its GPU's runs train in their own
        processes. Called every few tenths of a second by its supervisor."""
        now = time.monotonic()
        for gpu, process in self.processes.items():
            if gpu in self.given_up or process.poll() is None:
                continue
            if gpu not in self.restart_at:  # found ended now
                where = f"GPU {gpu}" if gpu is not None else "this machine"
                quick = now - self.started_at[gpu] < QUICK_FAILURE_SECONDS
                self.quick_failures[gpu] = self.quick_failures[gpu] + 1 if quick else 0
                if self.quick_failures[gpu] >= MAX_QUICK_FAILURES:
                    log.error("the trainer of %s ended %d times in a row within %.0f s of its start (status %d): "
                              "no more trainers there; its runs train in their own processes", where,
                              self.quick_failures[gpu], QUICK_FAILURE_SECONDS, exit_status(process))
                    self.given_up.add(gpu)
                    continue
                delay = FIRST_RESTART_DELAY_SECONDS * 2 ** (self.quick_failures[gpu] - 1) if quick else 0.0
                log.warning("the trainer of %s ended (status %d); starting another%s", where, exit_status(process),
                            f" in {delay:g} s" if delay else "")
                self.restart_at[gpu] = now + delay
            if now >= self.restart_at[gpu]:
                del self.restart_at[gpu]
                self.start(gpu)

    def __enter__(self) -> TrainerPool:
        self.sockets = Path(tempfile.mkdtemp(prefix="cifar-resnet-"))
        for gpu in self.gpus:
            self.start(gpu)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes(list(self.processes.values()), TRAINER_STOP_SECONDS)
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)
