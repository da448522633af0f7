"""Errors that stand for a user mistake: the CLI reports them in one line, without a traceback."""


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
