"""Errors for bad input. The CLI prints their message (which names the file, row, key or value and what
was expected) without a traceback; anything else is a bug and keeps its traceback."""


class InputError(ValueError):
    """Bad input from the user: a file, row, column, key or value that does not fit."""


class RunError(RuntimeError):
    """A run that had to stop for a reason its message gives (e.g. a loss that stayed NaN); the last good
    state it wrote stays usable. The CLI prints the message without a traceback and exits with 1."""
