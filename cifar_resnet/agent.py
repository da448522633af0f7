"""`cifar-resnet agent SWEEP_ID`: a pool of W&B agents on this machine, one per visible GPU (or K per GPU), each
pinned to its GPU with CUDA_VISIBLE_DEVICES. It is the Docker image's entry point, and works outside Docker too.

Each agent is W&B's own `wandb agent --forward-signals`, which starts every run as a fresh
`python -m cifar_resnet.train` process: a run's GPU memory is freed when its process ends. (`wandb.agent(function=...)`
is not used: it runs every trial inside one Python process, where GPU memory and CUDA state build up across runs.)

SIGTERM and SIGINT (a spot machine's preemption notice, `docker stop`, Ctrl-C, a scheduler's cancel) are forwarded
to every agent, and SIGUSR1 (a batch scheduler's warning) as SIGTERM; each agent forwards it to its run: the run
saves its state, marks itself preempting and exits, and the sweep requeues it. This command exits once every agent
has: 0 when all ended well (`--count` runs each, or the sweep has no more work), else the first failure's status;
2, in one line, when W&B has no such sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from .children import start_process
from .credentials import NO_CREDENTIALS, has_credentials
from .errors import UserError, reject_unknown_arguments
from .gpus import AUTO, check_gpus_exist, parse_runs_per_gpu, resolve_runs_per_gpu
from .packing.pool import OFF, STREAMS, TrainerPool, add_pack_arguments, pack_mode
from .staggered import Launch, first_failure, run_staggered_statuses
from .wandb_sweep import DEFAULT_STAGGER_SECONDS, agent_argv

SWEEP_ID_VARIABLE = "SWEEP_ID"  # the sweep id when none is given on the command line (the Docker image's way)
# What `wandb agent` writes once it has joined the sweep (its run loop's first log line, or its first run), and what
# it writes, before that, when the sweep does not exist ("ValueError: Sweep E/P/ID not found" when it looks the sweep
# up; "Sweep was deleted or agent was not found" when the server refuses its heartbeat).
JOINED = re.compile(r"Running runs:|Agent Starting Run")
SWEEP_NOT_FOUND = re.compile(r"Sweep \S+ not found|Sweep was deleted or agent was not found")
HELD_LINES_LIMIT = 200  # start-up lines held back at most; past them, an agent's output is passed on as it comes
RELAY_DRAIN_SECONDS = 5.0  # how long to wait for an ended agent's last lines (a grandchild may keep its pipe open)


def visible_gpus() -> list[str]:
    """The GPUs to share out: the entries of CUDA_VISIBLE_DEVICES when it is set (each a GPU of this machine, or a
    UserError: an agent pinned to no GPU would train on the CPU), else every GPU CUDA sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = [entry.strip() for entry in listed.split(",") if entry.strip()]
        check_gpus_exist(gpus, "CUDA_VISIBLE_DEVICES", "name GPUs it has, or unset it to use every GPU (none: the CPU)")
        return gpus
    import torch  # deferred: only the count is needed, and torch's import is slow

    return [str(index) for index in range(torch.cuda.device_count())]


def plan_agents(argv: Sequence[str], gpus: Sequence[str], agents_per_gpu: int,
                trainers: TrainerPool | None = None) -> list[Launch]:
    """`agents_per_gpu` copies of `argv` pinned to each GPU (their runs handing their training to the GPU's trainer,
    when there are `trainers`); one unpinned when there is no GPU (its runs in the machine's one trainer)."""
    if not gpus:
        return [Launch(list(argv), None, trainers.environment(None) if trainers is not None else {})]
    return [Launch(list(argv), gpu, trainers.environment(gpu) if trainers is not None else {})
            for gpu in gpus for _ in range(agents_per_gpu)]


class AgentOutputs:
    """Starts the agents with their output (stdout and stderr, their runs' included) through this process, which
    passes it on to its stderr line by line.

    An agent's start-up lines are held back until it has joined the sweep: when the sweep does not exist, the user
    gets one line of ours instead of W&B's traceback. (Its runs start after the join.)
    """

    def __init__(self) -> None:
        self.missing_sweep: list[str] = []  # the lines that said so, one per agent that could not join
        self.relays: list[threading.Thread] = []

    def start(self, argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        process = start_process(argv, env, subprocess.PIPE)
        relay = threading.Thread(target=self.relay, args=(process,), daemon=True)
        relay.start()
        self.relays.append(relay)
        return process

    def relay(self, process: subprocess.Popen) -> None:
        held: list[bytes] | None = []  # None once passing lines on as they come
        for line in process.stdout:
            if held is None:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
                continue
            held.append(line)
            if JOINED.search(line.decode(errors="replace")) or len(held) > HELD_LINES_LIMIT:
                sys.stderr.buffer.write(b"".join(held))
                sys.stderr.flush()
                held = None
        if held is None:
            return
        text = b"".join(held).decode(errors="replace")
        if process.wait() != 0 and (found := SWEEP_NOT_FOUND.search(text)):
            self.missing_sweep.append(found.group(0))
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def wait(self) -> None:
        for relay in self.relays:
            relay.join(RELAY_DRAIN_SECONDS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_id", nargs="?", default=None, metavar="SWEEP_ID",
                        help=f"the sweep, ENTITY/PROJECT/ID as `wandb sweep` prints it (default: ${SWEEP_ID_VARIABLE})")
    parser.add_argument("--agents-per-gpu", default=AUTO, metavar="K|auto",
                        help="agents sharing each GPU, for models too small to keep one busy; auto: from the table "
                        "keyed by GPU memory in cifar_resnet/gpus.py (default: auto)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="runs per agent, then it exits (`wandb agent --count`; default: until the sweep has no "
                        "more work), so that a batch job gives its GPU back")
    parser.add_argument("--project", default=None, help="W&B project, when SWEEP_ID does not name it")
    parser.add_argument("--entity", default=None, help="W&B entity, when SWEEP_ID does not name it")
    parser.add_argument("--stagger", type=float, default=DEFAULT_STAGGER_SECONDS, metavar="SECONDS",
                        help=f"seconds between agent starts (default: {DEFAULT_STAGGER_SECONDS:g})")
    add_pack_arguments(parser, "streams when a GPU has more than one agent, else off")


def agent_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("agent", rest)
    sweep_id = (args.sweep_id or os.environ.get(SWEEP_ID_VARIABLE, "")).strip()
    if not sweep_id:
        raise UserError(f"SWEEP_ID: no sweep given; pass it (cifar-resnet agent ENTITY/PROJECT/ID) or set "
                        f"${SWEEP_ID_VARIABLE}")
    agents_per_gpu = parse_runs_per_gpu(args.agents_per_gpu, "--agents-per-gpu")
    asked_mode = pack_mode(args.pack)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count: must be >= 1, got {args.count}")
    if args.stagger < 0:
        raise UserError(f"--stagger: must be >= 0 seconds, got {args.stagger:g}")
    if not has_credentials():
        raise UserError(f"{NO_CREDENTIALS}; agents need W&B's server: pass -e WANDB_API_KEY to docker run, or "
                        "export it")
    if shutil.which("wandb") is None:
        raise UserError("wandb: the `wandb` command is not on PATH; run inside the environment the package is in")
    gpus = visible_gpus()
    agents_per_gpu = resolve_runs_per_gpu(agents_per_gpu, gpus) if gpus else 1
    mode = asked_mode or (STREAMS if gpus and agents_per_gpu > 1 else OFF)
    outputs = AgentOutputs()
    # The trainers stop once every agent has ended (by then their runs have ended too); one that ends before is
    # started again. Without a GPU, the agent's runs take turns in the machine's one trainer, as a sweep's do.
    runs = [gpu for gpu in gpus for _ in range(agents_per_gpu)] or [None]
    with TrainerPool(runs, mode=mode) if mode != OFF else contextlib.nullcontext() as trainers:
        launches = plan_agents(agent_argv(sweep_id, args.project, args.entity, args.count), gpus, agents_per_gpu,
                               trainers)
        statuses = run_staggered_statuses(launches, args.stagger, "agent", outputs.start,
                                          trainers.revive if trainers is not None else None)
    outputs.wait()
    if outputs.missing_sweep:
        raise UserError(f"SWEEP_ID: W&B has no sweep {sweep_id} ({outputs.missing_sweep[0]}); check the id that "
                        f"`wandb sweep` printed, and --project/--entity")
    return first_failure(statuses, "agent")
