"""Errors for bad input. The CLI prints their message (which names the file, row, key or value and what
was expected) without a traceback; anything else is a bug and keeps its traceback.

``InputError`` is defined in ``scorers.errors`` (the scorers import nothing of the trainer) and is the same
class here, so one ``except InputError`` catches it from either package."""

from scorers.errors import InputError as InputError


class RunError(RuntimeError):
    """A run that had to stop for a reason its message gives (e.g. a loss that stayed NaN); the last good
    state it wrote stays usable. The CLI prints the message without a traceback and exits with 1."""
