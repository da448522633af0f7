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
import os
import shutil
from collections.abc import Sequence

from .credentials import has_credentials
from .errors import UserError
from .gpus import AUTO, parse_runs_per_gpu, resolve_runs_per_gpu
from .process import Launch, reject_unknown_arguments, run_staggered
from .wandb_sweep import DEFAULT_STAGGER_SECONDS, agent_argv

SWEEP_ID_VARIABLE = "SWEEP_ID"  # the sweep id when none is given on the command line (the Docker image's way)


def visible_gpus() -> list[str]:
    """The GPUs to share out: the entries of CUDA_VISIBLE_DEVICES when it is set, else every GPU CUDA sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    import torch  # deferred: only the count is needed, and torch's import is slow

    return [str(index) for index in range(torch.cuda.device_count())]


def plan_agents(argv: Sequence[str], gpus: Sequence[str], agents_per_gpu: int) -> list[Launch]:
    """`agents_per_gpu` copies of `argv` pinned to each GPU; one unpinned when there is no GPU."""
    if not gpus:
        return [Launch(list(argv), None)]
    return [Launch(list(argv), gpu) for gpu in gpus for _ in range(agents_per_gpu)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_id", nargs="?", default=None, metavar="SWEEP_ID",
                        help=f"the sweep, ENTITY/PROJECT/ID as `wandb sweep` prints it (default: ${SWEEP_ID_VARIABLE})")
    parser.add_argument("--agents-per-gpu", default=AUTO, metavar="K|auto",
                        help="agents sharing each GPU, for models too small to keep one busy; auto: from the table "
                        "keyed by GPU memory in cifar_resnet/gpus.py (default: auto)")
    parser.add_argument("--project", default=None, help="W&B project, when SWEEP_ID does not name it")
    parser.add_argument("--entity", default=None, help="W&B entity, when SWEEP_ID does not name it")
    parser.add_argument("--stagger", type=float, default=DEFAULT_STAGGER_SECONDS, metavar="SECONDS",
                        help=f"seconds between agent starts (default: {DEFAULT_STAGGER_SECONDS:g})")


def agent_command(args: argparse.Namespace, rest: Sequence[str]) -> int:
    reject_unknown_arguments("agent", rest)
    sweep_id = (args.sweep_id or os.environ.get(SWEEP_ID_VARIABLE, "")).strip()
    if not sweep_id:
        raise UserError(f"SWEEP_ID: no sweep given; pass it (cifar-resnet agent ENTITY/PROJECT/ID) or set "
                        f"${SWEEP_ID_VARIABLE}")
    agents_per_gpu = parse_runs_per_gpu(args.agents_per_gpu, "--agents-per-gpu")
    if args.stagger < 0:
        raise UserError(f"--stagger: must be >= 0 seconds, got {args.stagger:g}")
    if not has_credentials():
        raise UserError("WANDB_API_KEY: not set (and no `wandb login` key); agents need W&B's server: "
                        "pass -e WANDB_API_KEY to docker run, or export it")
    if shutil.which("wandb") is None:
        raise UserError("wandb: the `wandb` command is not on PATH; run inside the environment the package is in")
    gpus = visible_gpus()
    launches = plan_agents(agent_argv(sweep_id, args.project, args.entity), gpus,
                           resolve_runs_per_gpu(agents_per_gpu, gpus) if gpus else 1)
    return run_staggered(launches, args.stagger, "agent")
