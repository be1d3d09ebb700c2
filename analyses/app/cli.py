"""The ``interp`` command line: the command group, its entry point and its error contract.

Reading order of the app layer, top-down:

- this module: :data:`cli` (the click group), :func:`main` (the console script,
  ``interp = "analyses.app.cli:main"``) and how errors reach the user;
- :mod:`analyses.app.common`: what every command shares (options, model loading, the
  report folder), re-exported here for the topic modules;
- the built-in commands :mod:`~analyses.app.info_cmd`, :mod:`~analyses.app.plot_cmd` and
  :mod:`~analyses.app.report_cmd`; the topic commands and report sections in
  :mod:`analyses.app.sections` (topics add commands with ``@cli.command(...)`` or
  ``cli.add_command(...)``; see there for discovery);
- :mod:`analyses.app.report` (the report folder) with :mod:`~analyses.app.render` (its
  pages), :mod:`~analyses.app.plots` (figures) and :mod:`~analyses.app.paths` (no machine
  paths in a report).

Error contract (DESIGN.md, "Command line"): bad input prints ONE line ``error: <message>``
on stderr and exits with code 2, never a traceback; Ctrl-C prints ``interrupted`` and
exits 130. The report writer builds in a temporary folder, so neither leaves a half-
written report behind. Real bugs (anything not listed in :data:`USER_ERRORS`) still show
their traceback, and ``INTERP_DEBUG=1`` shows it for user errors too.

Signals (issue 24): :func:`main` makes SIGTERM and SIGHUP stop a run the way Ctrl-C does
(the temporary folder and the ``--out`` lock are cleaned up, one line ``interrupted``), with
the shell's exit code 128 + the signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP
(143 rather than 130 so ``timeout``, systemd or a batch system can tell a kill from a
Ctrl-C). Ctrl-C during start-up is covered too: importing this module loads only click and
the standard library; torch, pandas, matplotlib, the commands and the topics load inside
the command's error handling, after the handlers are installed. A signal that lands while
the Python interpreter itself starts, before this module runs, is Python's: the process is
killed by it silently (the shell still reports 130). Two runs on one ``--out`` cannot both
write it: see :mod:`analyses.app.outdir`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from analyses.app.errors import USER_ERRORS, CliError, Interrupted, describe, one_line

if TYPE_CHECKING:
    from analyses.app.common import (
        DEFAULT_MODEL,
        common_options,
        load_model,
        model_argument,
        prepare_out,
        resolve_device,
        write_report,
    )
    from interp.progress import progress_bar as progress_for

__all__ = [
    "DEFAULT_MODEL",
    "USER_ERRORS",
    "CliError",
    "cli",
    "common_options",
    "load_model",
    "main",
    "model_argument",
    "prepare_out",
    "progress_for",
    "resolve_device",
    "write_report",
]

# What every command shares, re-exported for the topic modules from analyses.app.common.
_FROM_COMMON = frozenset({"DEFAULT_MODEL", "common_options", "load_model", "model_argument",
                          "prepare_out", "resolve_device", "write_report"})


def __getattr__(name: str) -> Any:
    """The re-exported names, imported on first use (PEP 562).

    Why lazily: they pull in torch, pandas and matplotlib (seconds), and :func:`main` must
    install its signal handlers before that, so Ctrl-C during start-up is handled too.
    ``progress_for`` is the progress callable for a command's ``--quiet``: the one tqdm bar
    of :func:`interp.progress.progress_bar`, kept under this name for the topic modules.
    """
    if name in _FROM_COMMON:
        from analyses.app import common

        value = getattr(common, name)
    elif name == "progress_for":
        from interp.progress import progress_bar

        value = progress_bar
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


class InterpGroup(click.Group):
    """The ``interp`` group: lazy command discovery and the one-line error contract.

    The error handling sits in :meth:`main` (not only in the console-script wrapper) so
    ``click.testing.CliRunner`` sees exactly what a user sees.
    """

    def _load_commands(self) -> None:
        """Add the built-in commands, then the topics' (first call only; cheap after).

        Here rather than at import so the heavy imports run inside :meth:`_run`'s error
        handling, after :func:`main` installed the signal handlers.
        """
        from analyses.app.info_cmd import info_cmd
        from analyses.app.plot_cmd import plot_cmd
        from analyses.app.report_cmd import report_cmd
        from analyses.app.sections import load_topics

        for command in (info_cmd, plot_cmd, report_cmd):
            if command.name not in self.commands:
                self.add_command(command)
        load_topics()

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_commands()
        return super().get_command(ctx, cmd_name)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        ctx = super().make_context(info_name, list(args), parent=parent, **extra)
        # Keep the raw command line for run.json / the report header.
        ctx.meta.setdefault("interp.argv", ["interp", *args])
        return ctx

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str | None,
             complete_var: str | None, **extra: Any) -> int:
        """Run the command and turn what it raised into an exit code and one stderr line."""
        debug = bool(os.environ.get("INTERP_DEBUG"))
        try:
            rv = super().main(args=args, prog_name=prog_name or "interp",
                              complete_var=complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            return e.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt) as e:
            click.echo("interrupted", err=True)
            return e.exit_code if isinstance(e, Interrupted) else 130
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            return 2
        except click.ClickException as e:
            click.echo(f"error: {one_line(e.format_message())}", err=True)
            return e.exit_code
        except USER_ERRORS as e:
            if debug:
                raise
            click.echo(f"error: {one_line(describe(e))}", err=True)
            return 2


@click.group("interp", cls=InterpGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                          "max_content_width": 100})
@click.version_option(package_name="interp", prog_name="interp")
def cli() -> None:
    """interp: hook any transformer, classify its heads, probe FFN knowledge, measure
    MoE specialisation and masking effects, and write reports.

    MODEL is "minilm" (the packaged all-MiniLM-L6-v2, the default), "smollm2-135m", a
    Hugging Face checkpoint folder, a .gguf file, an interp .pt checkpoint, or a .json
    ModelConfig file for a randomly initialised model.

    \b
    Example:
      interp info minilm
      interp plot minilm --text "The cat sat on the mat." --layer 2 --head 3 --out plots/cat
      interp report --out reports/default --force
    """


_signalled: list[int] = []  # the stop signals main()'s handler has seen


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """First stop signal: raise :class:`Interrupted` where the program is, so the code on
    the way out cleans up (temporary folder, lock) and :meth:`InterpGroup._run` prints
    ``interrupted``. A second one while that runs means "now": exit without waiting (what
    is left behind, the next run on that ``--out`` removes)."""
    _signalled.append(signum)
    if len(_signalled) > 1:
        os.write(2, b"interrupted\n")
        os._exit(128 + signum)
    raise Interrupted(signum)


def _handle_stop_signals(handler: Any) -> None:
    """Set ``handler`` for SIGINT, SIGTERM and SIGHUP, except where they are ignored
    (``nohup``, a background job): an ignored signal stays ignored."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)


def main() -> None:
    """Console-script entry point (``interp = "analyses.app.cli:main"``).

    Installs the stop-signal handlers first (here, never at import: the app owns the
    process, a library importer does not), then runs the group. Once the command has
    finished, a late signal gets the default action (the process ends with that signal, as
    the shell expects) rather than a traceback from the interpreter's shutdown.
    """
    _handle_stop_signals(_on_signal)
    # Figures are written to files; never open a window or need a display.
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        code = cli.main(prog_name="interp", standalone_mode=False)
        _flush()
        _handle_stop_signals(signal.SIG_DFL)
    except KeyboardInterrupt as e:  # landed just outside _run's handling
        click.echo("interrupted", err=True)
        code = e.exit_code if isinstance(e, Interrupted) else 130
    sys.exit(code)


def _flush() -> None:
    """Flush stdout and stderr now, while a signal can still be handled (see :func:`main`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    # ``python -m analyses.app.cli``: run the group the topics register on, which is that of
    # ``analyses.app.cli`` (this file run as __main__ is a second, separate module object).
    from analyses.app.cli import main as _main

    _main()
