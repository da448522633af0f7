"""Errors that stand for a user mistake: the CLI reports them in one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a setting, a file, a folder). The message names it and what is allowed."""


class ConfigError(UserError):
    """A setting has a value that is not allowed."""


class DataError(UserError):
    """A data set is missing, empty or unreadable."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite."""
