"""The `cifar-resnet` command (also `python -m cifar_resnet`). Every subcommand has `--help`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import StorageError, UserError
from .logs import PACKAGE_LOGGER, setup_logging
from .run_contract import EXIT_CRASH, EXIT_OK, EXIT_USAGE

log = logging.getLogger(PACKAGE_LOGGER)

PROG = "cifar-resnet"


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import main as train_main

    return train_main(rest, prog=f"{PROG} train")


def _evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import parse_argv
    from .runner import evaluate_checkpoint
    from .table import percent

    config, result = evaluate_checkpoint(Path(args.checkpoint), parse_argv(rest))
    print(f"{args.checkpoint}: test loss {result.loss:.4f}  test acc {percent(result.acc)}  "
          f"({int(result.confusion.sum())} images, dataset={config.dataset}, tta={config.tta}, "
          f"tta_translate_px={config.tta_translate_px})")
    return EXIT_OK


def _trainer(args: argparse.Namespace, rest: list[str]) -> int:
    from .packing.trainer import trainer_command

    return trainer_command(args, rest)


def _trainer_doc() -> str:
    return ("One trainer per GPU: runs whose process finds its socket in CIFAR_RESNET_TRAINER hand it their "
            "training, and it trains them together, in lockstep, each on a CUDA stream of its own (--pack streams) "
            "or, runs of one shape, as one fused model of --runs slots (--pack fused), writing each run's files as "
            "the run would. `cifar-resnet sweep` and `cifar-resnet agent` start one per GPU.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hyperparameter sweeps of a ResNet-style CNN on CIFAR-10 with Weights & Biases.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", add_help=False, help="train one run (what `wandb agent` starts); --help lists every setting"
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="test a saved best.pt (or a run's last.pt: its best weights so far) on its test set",
        description="Test a saved checkpoint: a best.pt, or a run's last.pt, whose best weights so far are tested "
        "(a last.pt stores no class names: the data's are used). Settings such as --data_dir, --dataset, --device "
        "or --tta=true override those stored in it.",
    )
    evaluate.add_argument("checkpoint", help="path to a best.pt or a last.pt")
    evaluate.set_defaults(handler=_evaluate)

    from . import report  # light modules: their heavy imports happen inside the handlers
    from .sweep import command as sweep

    sweep_parser = commands.add_parser(
        "sweep", help="run a whole sweep on this machine (W&B agents online; W&B's sweep engine offline)",
        description=sweep.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_arguments(sweep_parser)
    sweep_parser.set_defaults(handler=sweep.sweep_command)

    report_parser = commands.add_parser(
        "report", help="a sweep's results table (Markdown) and plots (PNG)", description=report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_arguments(report_parser)
    report_parser.set_defaults(handler=report.report_command)

    from . import agent  # light: torch and wandb are imported inside its handler

    agent_parser = commands.add_parser(
        "agent", help="one `wandb agent` per visible GPU, pinned (the Docker image's entry point)",
        description=agent.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_arguments(agent_parser)
    agent_parser.set_defaults(handler=agent.agent_command)

    trainer_parser = commands.add_parser(
        "trainer", help="train the runs of one GPU together (started by `sweep` and `agent`, one per GPU)",
        description=_trainer_doc(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trainer_parser.add_argument("--socket", required=True, help="the Unix socket to serve runs on")
    trainer_parser.add_argument("--device", default="auto", help="the device to train on (default: auto)")
    trainer_parser.add_argument("--pack", default="streams", metavar="MODE",
                                help="streams or fused: how its runs share the device (default: streams)")
    trainer_parser.add_argument("--runs", type=int, default=1, metavar="K",
                                help="the runs its supervisor plans for the device: the slots of a fused group "
                                "(default: 1)")
    trainer_parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                                help="its supervisor: once that process has gone and no run is left, the trainer "
                                "ends (default: the process that started it)")
    trainer_parser.set_defaults(handler=_trainer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return args.handler(args, rest)
    except UserError as error:
        log.error("%s", error)
        return EXIT_USAGE
    except StorageError as error:  # a full disk, say: the machine's problem, not a setting
        log.error("%s", error)
        return EXIT_CRASH
