"""The error classes shared by the scorers and by ``diffusion_dpo`` (which re-exports them from
``diffusion_dpo.errors``), so the command line catches them whichever side raised them: InputError for bad
input, RunError for a run that had to stop. They live here because ``scorers`` imports nothing of the
trainer."""


class InputError(ValueError):
    """Bad input from the user: a file, row, column, key or value that does not fit."""


class RunError(RuntimeError):
    """A run that had to stop for a reason its message gives (e.g. a loss that stayed NaN, a scoring server
    that stopped answering); the last good state it wrote stays usable. The CLI prints the message without a
    traceback and exits with 1. Defined here, like InputError, so a scorer can raise it."""
