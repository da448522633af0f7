"""Errors that stand for a user mistake: the CLI reports them in one line, without a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


class UserError(Exception):
    """A mistake in the user's input (a setting, a file, a folder). The message names it and what is allowed."""


class ConfigError(UserError):
    """A setting has a value that is not allowed."""


class DataError(UserError):
    """A data set is missing, empty or unreadable."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite."""


class StorageError(Exception):
    """A file could not be written (the disk is full, the folder is read-only, ...): the machine's problem, not a
    setting's, so the exit status is 1. The message is one line naming the file and the operating system's reason;
    the file's previous version, if any, is intact (writes are atomic)."""


class RunFailed(Exception):
    """A run failed in another process (its trainer), not by the user's input: the message is that process's one
    line (its log holds any traceback), and the exit status is 1."""


@contextlib.contextmanager
def extra_needed(extra: str, command: str) -> Iterator[None]:
    """Around the imports of what only the package's `extra` installs (a worker's install has none of them): a
    missing module becomes one line that names the extra to install."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise UserError(f"cifar-resnet {command} needs the [{extra}] extra ({error.name} is not installed): "
                        f"pip install 'cifar-resnet[{extra}]', or pip install -e '.[{extra}]' in a clone") from None


def reject_unknown_arguments(command: str, rest: Sequence[str]) -> None:
    """The CLI passes what argparse did not know on to the handlers; a tool that takes none refuses it here."""
    if rest:
        raise UserError(f"{command}: unknown argument {rest[0]!r} (see cifar-resnet {command} --help)")
