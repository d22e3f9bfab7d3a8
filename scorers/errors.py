"""The one error class for bad input, shared by the scorers and by ``diffusion_dpo`` (which re-exports it
from ``diffusion_dpo.errors``), so the command line catches it whichever side raised it. It lives here
because ``scorers`` imports nothing of the trainer."""


class InputError(ValueError):
    """Bad input from the user: a file, row, column, key or value that does not fit."""
