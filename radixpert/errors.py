"""Errors that reach the user as one line, each with a documented exit code.

Exit codes (shared by every ``radixpert-*`` command):

* 0 - success
* 1 - internal error (a bug: please report it)
* 2 - usage error (bad option or configuration)
* 3 - an input file was refused or unreadable (the rest of a batch still runs)
* 4 - a model, checkpoint or bundle is missing or invalid
* 5 - export: an exported engine drifted from the PyTorch model beyond a parity threshold
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_PARITY = 5


class RadixpertError(Exception):
    """Base class: the message is one line saying what is wrong and what to do."""

    exit_code: int = EXIT_INTERNAL
    code: str = "internal"


class UsageError(RadixpertError):
    exit_code = EXIT_USAGE
    code = "usage"


class InputError(RadixpertError):
    """An input image was refused or could not be read."""

    exit_code = EXIT_INPUT
    code = "input"


class ModelError(RadixpertError):
    """A checkpoint, model folder or bundle is missing or invalid."""

    exit_code = EXIT_MODEL
    code = "model"


class ParityError(ModelError):
    """An exported engine drifted from the PyTorch model beyond a threshold."""

    exit_code = EXIT_PARITY
    code = "parity"
