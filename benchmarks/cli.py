"""What the benchmark scripts share on their command line: one parser for a script's own options and every run
setting (so `--help` prints one `usage:` block), logging, and a user mistake as one line and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

from cifar_resnet.config import Config, argument_parser
from cifar_resnet.errors import UserError
from cifar_resnet.logs import setup_logging
from cifar_resnet.run_contract import EXIT_USAGE, LOG_FORMAT

log = logging.getLogger("benchmarks")


def settings_parser(prog: str, usage: str, description: str) -> argparse.ArgumentParser:
    """A parser with one `--name=value` option per run setting; the script adds its own options (`usage` shows
    them, as the settings' list is long). A bad value is a ConfigError (one line), not argparse's usage and exit."""
    parser = argument_parser(prog, description)
    parser.usage = f"{prog} {usage} [--setting=value ...]"
    return parser


def settings_from(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The run settings given on the command line, on top of `base`."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    return Config.from_mapping(given, base=base)


def run_script(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`, a user mistake (a UserError) logged in one line with exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except UserError as error:
        log.error("%s", error)
        return EXIT_USAGE


def start_logging() -> None:
    """The package's log lines and the script's own (its module is `__main__` under `python -m`), one line each on
    stderr."""
    setup_logging()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
