"""`cifar-resnet agent SWEEP_ID`: a pool of W&B agents on this machine, one per visible GPU (or K per GPU), each
pinned to its GPU with CUDA_VISIBLE_DEVICES. It is the Docker image's entry point, and works outside Docker too.

Each agent is W&B's own `wandb agent --forward-signals`, which starts every run as a fresh
`python -m cifar_resnet.train` process: a run's GPU memory is freed when its process ends. (`wandb.agent(function=...)`
is not used: it runs every trial inside one Python process, where GPU memory and CUDA state build up across runs.)

SIGTERM and SIGINT (a spot machine's preemption notice, `docker stop`, Ctrl-C) are forwarded to every agent, which
forwards them to its run: the run saves its state, marks itself preempting and exits, and the sweep requeues it.
This command exits once every agent has, with a non-zero status if any of them failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError

log = logging.getLogger(__name__)

SWEEP_ID_VARIABLE = "SWEEP_ID"  # the sweep id when none is given on the command line (the Docker image's way)
DEFAULT_STAGGER_SECONDS = 5.0  # between agent starts, so that they do not all call W&B and load data at once
POLL_SECONDS = 0.2  # how often signals are forwarded and agents checked while waiting
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    gpu: str | None  # the CUDA_VISIBLE_DEVICES value it is pinned to; None: not pinned (no GPU)


def visible_gpus() -> list[str]:
    """The GPUs to share out: the entries of CUDA_VISIBLE_DEVICES when it is set, else every GPU CUDA sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch  # deferred: only the count is needed, and torch's import is slow

    return [str(index) for index in range(torch.cuda.device_count())]


def plan_agents(sweep_id: str, gpus: Sequence[str], agents_per_gpu: int, project: str | None = None,
                entity: str | None = None) -> list[Launch]:
    """`agents_per_gpu` agents pinned to each GPU; one unpinned agent when there is no GPU."""
    argv = ["wandb", "agent", "--forward-signals"]
    if project:
        argv += ["--project", project]
    if entity:
        argv += ["--entity", entity]
    argv.append(sweep_id)
    if not gpus:
        return [Launch(argv, None)]
    return [Launch(argv, gpu) for gpu in gpus for _ in range(agents_per_gpu)]


def run_agents(launches: Sequence[Launch], stagger_seconds: float) -> int:
    """Start the agents `stagger_seconds` apart, forward SIGTERM and SIGINT to them, wait for all; return 0 when
    all succeeded, else the exit status of the first that failed (128 + N for one killed by signal N)."""
    from .train import stop_on_signals

    agents: list[subprocess.Popen] = []
    forwarded = 0
    # The handlers only record signals; they are forwarded here, between steps, so that none is lost or sent
    # twice to an agent started meanwhile.
    with stop_on_signals(FORWARDED_SIGNALS) as received:

        def pause(seconds: float) -> None:
            """Sleep until `seconds` have passed or a signal comes, forwarding it to every running agent."""
            nonlocal forwarded
            deadline, signals_before = time.monotonic() + seconds, len(received)
            while True:
                for signum in received[forwarded:]:
                    log.info("forwarding signal %d to %d agents", signum, len(agents))
                    for agent in agents:
                        if agent.poll() is None:
                            agent.send_signal(signum)
                forwarded = len(received)
                left = deadline - time.monotonic()
                if left <= 0 or len(received) > signals_before:
                    return
                time.sleep(min(left, POLL_SECONDS))

        for index, launch in enumerate(launches):
            if index:
                pause(stagger_seconds)
            if received:  # asked to stop before every agent started: start no more
                break
            pinned = {} if launch.gpu is None else {"CUDA_VISIBLE_DEVICES": launch.gpu}
            # Its own session: a Ctrl-C at the terminal reaches the agents once, through this process.
            agents.append(subprocess.Popen(launch.argv, env={**os.environ, **pinned}, start_new_session=True))
            log.info("agent %d of %d started (pid %d) on %s", index + 1, len(launches), agents[-1].pid,
                     f"GPU {launch.gpu}" if launch.gpu is not None else "no GPU")
        while any(agent.poll() is None for agent in agents):
            pause(POLL_SECONDS)

    statuses = [128 - agent.returncode if agent.returncode < 0 else agent.returncode for agent in agents]
    for number, status in enumerate(statuses, start=1):
        if status:
            log.error("agent %d exited with status %d", number, status)
    return next((status for status in statuses if status), 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_id", nargs="?", default=None, metavar="SWEEP_ID",
                        help=f"the sweep, ENTITY/PROJECT/ID as `wandb sweep` prints it (default: ${SWEEP_ID_VARIABLE})")
    parser.add_argument("--agents-per-gpu", type=int, default=1, metavar="K",
                        help="agents sharing each GPU, for models too small to keep one busy (default: 1)")
    parser.add_argument("--project", default=None, help="W&B project, when SWEEP_ID does not name it")
    parser.add_argument("--entity", default=None, help="W&B entity, when SWEEP_ID does not name it")
    parser.add_argument("--stagger", type=float, default=DEFAULT_STAGGER_SECONDS, metavar="SECONDS",
                        help=f"seconds between agent starts (default: {DEFAULT_STAGGER_SECONDS:g})")


def agent_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise UserError(f"agent: unknown argument {rest[0]!r} (see cifar-resnet agent --help)")
    sweep_id = (args.sweep_id or os.environ.get(SWEEP_ID_VARIABLE, "")).strip()
    if not sweep_id:
        raise UserError(f"SWEEP_ID: no sweep given; pass it (cifar-resnet agent ENTITY/PROJECT/ID) or set "
                        f"${SWEEP_ID_VARIABLE}")
    if args.agents_per_gpu < 1:
        raise UserError(f"--agents-per-gpu: must be >= 1, got {args.agents_per_gpu}")
    if args.stagger < 0:
        raise UserError(f"--stagger: must be >= 0 seconds, got {args.stagger:g}")
    from .tracking import has_credentials

    if not has_credentials():
        raise UserError("WANDB_API_KEY: not set (and no `wandb login` key); agents need W&B's server: "
                        "pass -e WANDB_API_KEY to docker run, or export it")
    if shutil.which("wandb") is None:
        raise UserError("wandb: the `wandb` command is not on PATH; run inside the environment the package is in")
    launches = plan_agents(sweep_id, visible_gpus(), args.agents_per_gpu, args.project, args.entity)
    return run_agents(launches, args.stagger)
