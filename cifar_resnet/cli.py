"""The `cifar-resnet` command (also `python -m cifar_resnet`). Every subcommand has `--help`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import UserError

log = logging.getLogger("cifar_resnet")


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import main as train_main

    return train_main(rest)


def _evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import parse_argv
    from .runner import evaluate_checkpoint

    config, result = evaluate_checkpoint(Path(args.checkpoint), parse_argv(rest))
    print(f"{args.checkpoint}: test loss {result.loss:.4f}  test acc {result.acc:.4f}  "
          f"({int(result.confusion.sum())} images, dataset={config.dataset}, tta={config.tta})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-resnet",
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
        help="test a saved best.pt on its test set",
        description="Test a saved checkpoint. Settings such as --data_dir, --dataset, --device or --tta=true "
        "override those stored in it.",
    )
    evaluate.add_argument("checkpoint", help="path to a best.pt")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .train import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return args.handler(args, rest)
    except UserError as error:
        log.error("%s", error)
        return 2
