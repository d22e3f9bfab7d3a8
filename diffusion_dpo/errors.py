"""Errors for bad input. The CLI prints their message (which names the file, row, key or value and what
was expected) without a traceback; anything else is a bug and keeps its traceback.

``InputError`` is defined in ``scorers.errors`` (the scorers import nothing of the trainer) and is the same
class here, so one ``except InputError`` catches it from either package; so is ``RunError`` (a run that had
to stop, e.g. a scoring server that stopped answering)."""

from scorers.errors import InputError as InputError
from scorers.errors import RunError as RunError
