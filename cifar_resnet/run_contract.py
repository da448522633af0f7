"""The contract between a run and whatever starts it (the sweep, W&B's agent, `cifar-resnet agent`, a trainer, the
benchmark, a scheduler): how its exit status reads, how its log marks its one-line error, and the variable that
hands its training to a trainer. Each is defined here once, and both sides import it. Where its files go is the
other part of that contract: `records.RunFolder`, beside the record it checks.

Its own module, not beside the process plumbing (`signals.py`, `children.py`): the run's side (the runner, `train`,
the trainer) needs these facts but none of that plumbing, and a leaf that imports almost nothing can be imported by
anything.
"""

from __future__ import annotations

import logging

# --- exit status: what `train` and every tool's command exit with --------------------------------------------------
EXIT_OK = 0  # finished (or finished earlier with the same settings: a finished run is never trained again)
EXIT_CRASH = 1  # the machine's fault: diverged, a file not written (a full disk), a crash; one line says which
EXIT_USAGE = 2  # the user's input: one line names the setting or file and what is allowed
SIGNAL_EXIT_BASE = 128  # stopped by signal N (a run after saving its state): 128 + N, as shells report it

# --- the log: one line per message, `LEVEL: message`; a run's one-line error starts with ERROR_LINE_PREFIX ----------
LEVEL_SEPARATOR = ": "
LOG_FORMAT = f"%(levelname)s{LEVEL_SEPARATOR}%(message)s"
ERROR_LINE_PREFIX = f"{logging.getLevelName(logging.ERROR)}{LEVEL_SEPARATOR}"

# The socket of the trainer (`cifar-resnet trainer`) that a run hands its training to, set by its supervisor.
TRAINER_VARIABLE = "CIFAR_RESNET_TRAINER"
