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
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from analyses.app.common import (
    DEFAULT_MODEL,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    resolve_device,
    write_report,
)
from analyses.app.errors import USER_ERRORS, CliError, describe, one_line
from analyses.app.info_cmd import info_cmd
from analyses.app.plot_cmd import plot_cmd
from analyses.app.report_cmd import report_cmd
from interp.progress import progress_bar

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

# The progress callable for a command's ``--quiet``: the one tqdm bar of interp.progress.
# Kept under this name because topic modules import it from here.
progress_for = progress_bar


class InterpGroup(click.Group):
    """The ``interp`` group: lazy topic discovery and the one-line error contract.

    The error handling sits in :meth:`main` (not only in the console-script wrapper) so
    ``click.testing.CliRunner`` sees exactly what a user sees.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        from analyses.app.sections import load_topics

        load_topics()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from analyses.app.sections import load_topics

        load_topics()
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
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            return 130
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


for _command in (info_cmd, plot_cmd, report_cmd):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point (``interp = "analyses.app.cli:main"``)."""
    # Figures are written to files; never open a window or need a display.
    os.environ.setdefault("MPLBACKEND", "Agg")
    cli.main(prog_name="interp")


if __name__ == "__main__":
    main()
