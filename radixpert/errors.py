"""Errors that reach the user as one line, each with a documented exit code.

Exit codes (shared by every ``radixpert-*`` command):

* 0 - success
* 1 - internal error (a bug: please report it)
* 2 - usage error (bad option or configuration)
* 3 - an input file was refused or unreadable (the rest of a batch still runs)
* 4 - a model, checkpoint or bundle is missing or invalid
* 5 - export: an exported engine drifted from the PyTorch model beyond a parity threshold
* 6 - run: at least one report was withheld by a check (``--on-conflict`` / ``--on-implausible
  withhold``); its JSON row keeps the verdicts. 3 wins when a scan was also refused
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_PARITY = 5
EXIT_WITHHELD = 6


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


F = TypeVar("F", bound=Callable[..., Any])
DEBUG_ENV = "RADIXPERT_DEBUG"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its class name when empty), at most ``limit`` characters.

    For library errors that are shown to users inside a RadixpertError's one-line message.
    """
    text = str(exc).strip()
    return (text.splitlines()[0].strip() if text else exc.__class__.__name__)[:limit]


def cli_errors(interrupted: str = "interrupted") -> Callable[[F], F]:
    """Decorate a CLI entry point so that every failure is one stderr line with its exit code.

    RadixpertError: ``error: <message>`` and its exit code. Click's own usage errors keep click's
    wording and code. A full disk is a usage error. Anything else is a bug: only the exception's
    class is printed, because library messages can quote file names or DICOM values; the
    traceback is shown with RADIXPERT_DEBUG=1. ``interrupted`` is printed on Ctrl-C (exit 130).
    """
    import click

    def decorate(entry: F) -> F:
        @functools.wraps(entry)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return entry(*args, **kwargs)
            except click.exceptions.Abort:
                click.echo(interrupted, err=True)
                sys.exit(130)
            except click.ClickException as exc:
                exc.show()
                sys.exit(exc.exit_code)
            except RadixpertError as exc:
                _echo("error:", str(exc))
                sys.exit(exc.exit_code)
            except KeyboardInterrupt:
                click.echo(interrupted, err=True)
                sys.exit(130)
            except Exception as exc:  # a bug: the class only, the traceback on request
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    _echo("error:", "the disk filled up; free some space and run it again")
                    sys.exit(EXIT_USAGE)
                if os.environ.get(DEBUG_ENV):
                    raise
                _echo("internal error:", f"{exc.__class__.__name__}; please report it ({DEBUG_ENV}=1 shows the traceback)")
                sys.exit(EXIT_INTERNAL)

        return wrapper  # type: ignore[return-value]

    return decorate


def _echo(label: str, message: str) -> None:
    import click

    click.echo(f"{click.style(label, fg='red')} {message}", err=True)
