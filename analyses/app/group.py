"""The ``interp`` click group: command discovery and the one-line error contract.

:data:`cli` is the group every command joins (reached as ``analyses.app.cli.cli``, the name
the topic modules and tests use); :class:`InterpGroup` turns what a command raised into an
exit code and one line on stderr (see :mod:`analyses.app.cli` for the contract). The
built-in commands and the topics are imported the first time a command is listed or looked
up, inside that error handling, so a Ctrl-C while they load is an ordinary interruption.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from analyses.app.errors import USER_ERRORS, describe, one_line
from analyses.app.signals import Interrupted

__all__ = ["InterpGroup", "cli"]


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
