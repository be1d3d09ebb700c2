"""What counts as a user's mistake, and how it is said: one line, ``error: <message>``.

The command line (DESIGN.md, "Command line") never shows a traceback for bad input: a
missing file, an unknown device, an existing report folder. :data:`USER_ERRORS` lists the
exception types that mean "the input was wrong" (anything else is a bug and keeps its
traceback); :func:`one_line` and :func:`describe` turn such an exception into the one line a
user reads. :class:`CliError` is what command code raises itself for the same purpose.
Stop signals (Ctrl-C, SIGTERM) are not errors: see :mod:`analyses.app.signals`.

Light on purpose (click and the standard library): the command group imports it before
torch, pandas and matplotlib load.
"""

from __future__ import annotations

from typing import IO, Any

import click

from analyses.app.outdir import ReportError

__all__ = ["USER_ERRORS", "CliError", "describe", "one_line"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ReportError)


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line for the terminal."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) or "unknown error"


def describe(exc: BaseException) -> str:
    """The user-facing text of an exception, without Python's decorations."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, KeyError) and type(exc) is KeyError and exc.args:
        return f"not found: {exc.args[0]}"
    return str(exc) or type(exc).__name__


class CliError(click.ClickException):
    """A user-facing error: printed as one ``error: ...`` line, exit code 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)
