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
import shutil
import subprocess
import sys
import tempfile
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


class TrainerPool:
    """One `cifar-resnet trainer` per GPU (a CUDA_VISIBLE_DEVICES value, or None for the machine's default device),
    started on entering and stopped on leaving (SIGTERM: each run it holds ends as preempted, resumable from its
    last.pt). `gpus` lists one entry per run slot of the supervisor (a GPU as often as runs share it): a GPU's
    trainer is told how many (`--runs`, the slots of its fused groups). A run pinned to a GPU hands its training to
    that GPU's trainer through the variables `environment(gpu)` gives it. Each trainer logs to
    `log_folder/trainer-<gpu>.log`, or, without a folder, to this process's stderr."""

    def __init__(self, gpus: Sequence[str | None], log_folder: Path | None = None, mode: str = STREAMS) -> None:
        self.runs = Counter(gpus)  # runs per GPU
        self.gpus = list(self.runs)
        self.log_folder, self.mode = log_folder, mode
        self.processes: dict[str | None, subprocess.Popen] = {}
        self.sockets: Path | None = None  # a short folder: a socket's path holds at most 107 bytes

    def socket(self, gpu: str | None) -> Path:
        assert self.sockets is not None, "TrainerPool used outside its `with` block"
        return self.sockets / f"trainer-{gpu if gpu is not None else 'default'}.sock"

    def environment(self, gpu: str | None) -> dict[str, str]:
        return {TRAINER_VARIABLE: str(self.socket(gpu))}

    def start(self, gpu: str | None) -> None:
        pinned = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        # A trainer holds every run of its GPU: it gets the GPU's share of the cores, as one run would alone.
        env = child_environment(len(self.gpus), **pinned, **CUDA_CONNECTIONS)
        argv = [sys.executable, "-m", "cifar_resnet", "trainer", f"--socket={self.socket(gpu)}",
                f"--pack={self.mode}", f"--runs={self.runs[gpu]}"]
        if self.log_folder is None:
            self.processes[gpu] = start_process(argv, env)
            return
        self.log_folder.mkdir(parents=True, exist_ok=True)
        name = f"trainer-{gpu if gpu is not None else 'default'}.log"
        with open(self.log_folder / name, "ab") as log_file:  # the child keeps its own copy of the descriptor
            self.processes[gpu] = start_process(argv, env, log_file)

    def revive(self) -> None:
        """Start again every trainer that has ended (killed, crashed). Its runs have ended as preempted, and
        resume from their last.pt in the new one."""
        for gpu in [gpu for gpu, process in self.processes.items() if process.poll() is not None]:
            log.warning("the trainer of %s ended (status %d); starting another",
                        f"GPU {gpu}" if gpu is not None else "this machine", exit_status(self.processes[gpu]))
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
