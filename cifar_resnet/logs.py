"""The package's log lines: one per message on stderr, `LEVEL: message` (run_contract.LOG_FORMAT), and how they
stay above a live display (rich's bars and tables) while one is drawn."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from .run_contract import LOG_FORMAT

PACKAGE_LOGGER = "cifar_resnet"


def setup_logging() -> None:
    """One line per message on stderr for the package's loggers; W&B's own lines are its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package_log = logging.getLogger(PACKAGE_LOGGER)
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


@contextlib.contextmanager
def logs_to_current_stderr() -> Iterator[None]:
    """While inside, the package's log lines go to `sys.stderr` as it is now. A live display (rich's bars and tables)
    puts a proxy there that prints each line above the display; a handler still writing to the terminal itself would
    print onto the display's last line."""
    handlers = [handler for handler in logging.getLogger(PACKAGE_LOGGER).handlers
                if isinstance(handler, logging.StreamHandler)]
    streams = [handler.stream for handler in handlers]
    # Set, not setStream(): that flushes the stream it replaces, which may be closed (an in-process caller's
    # captured stderr) and has nothing left to flush: every log line is flushed as it is written.
    for handler in handlers:
        handler.stream = sys.stderr
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams):
            handler.stream = stream
