"""The ``interp`` click group: command discovery and the one-line error contract.

:data:`cli` is the group every command joins (reached as ``analyses.app.cli.cli``, the name
the topic modules and tests use); :class:`InterpGroup` turns what a command raised into an
exit code and one line on stderr (see :mod:`analyses.app.cli` for the contract). The
built-in commands and the topics are imported the first time a command is listed or looked
up, inside that error handling, so a Ctrl-C while they load is an ordinary interruption.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import click

from analyses.app.errors import USER_ERRORS, describe, one_line
from analyses.app.signals import Interrupted

__all__ = ["InterpGroup", "cli"]


class _Stopped(Exception):
    """A Ctrl-C or stop signal carried past click's own handling of it.

    Click meets a :class:`KeyboardInterrupt` with a blank line on stderr and replaces it by
    ``Abort``, which loses the signal (SIGTERM would exit 130, not 143) and adds a line to
    the one-line contract; not a KeyboardInterrupt, so click lets it through.
    """

    def __init__(self, interrupt: KeyboardInterrupt) -> None:
        super().__init__("interrupted")
        self.interrupt = interrupt


@contextlib.contextmanager
def _past_click() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt as e:
        raise _Stopped(e) from e


def _interrupted(exc: BaseException | None, *, line_ended: bool = False) -> int:
    """Say ``interrupted`` (one line) and return the exit code, 128 + the signal number.

    On a terminal, Ctrl-C leaves the echoed ``^C`` on the current line: end that line first
    (unless click already did), so the message stands on its own line there too.
    """
    code = exc.exit_code if isinstance(exc, Interrupted) else 130
    if code == 130 and not line_ended and sys.stderr.isatty():
        click.echo(err=True)
    click.echo("interrupted", err=True)
    return code


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
        from analyses.app.activations_cmd import activations_cmd
        from analyses.app.info_cmd import info_cmd
        from analyses.app.plot_cmd import plot_cmd
        from analyses.app.report_cmd import report_cmd
        from analyses.app.sections import load_topics

        for command in (info_cmd, plot_cmd, report_cmd):
            if command.name not in self.commands:
                self.add_command(command)
        if activations_cmd.name not in self.commands:
            self.add_command(activations_cmd)
        load_topics()

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_commands()
        return super().get_command(ctx, cmd_name)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        with _past_click():  # --help lists the commands: the heavy imports run here
            ctx = super().make_context(info_name, list(args), parent=parent, **extra)
        # Keep the raw command line for run.json / the report header.
        ctx.meta.setdefault("interp.argv", ["interp", *args])
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        with _past_click():
            return super().invoke(ctx)

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
            with _distributed(args):
                rv = super().main(args=args, prog_name=prog_name or "interp",
                                  complete_var=complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            return e.exit_code
        except _Stopped as e:
            return _interrupted(e.interrupt)
        except click.exceptions.Abort as e:  # click's, for a Ctrl-C outside invoke()
            return _interrupted(e.__cause__, line_ended=True)
        except KeyboardInterrupt as e:
            return _interrupted(e)
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


def _distributed(args: Sequence[str] | None) -> contextlib.AbstractContextManager:
    """The process group of a torchrun / SLURM / ``--nproc`` rank (``WORLD_SIZE`` > 1), for
    the whole command; nothing (and no torch import) otherwise."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1", "0"):
        return contextlib.nullcontext()
    from analyses import distributed

    argv = list(sys.argv[1:] if args is None else args)
    device = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--device"), "auto")
    return distributed.session(device)


def _launch(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    """``--nproc N``: run the command as N local ranks (:mod:`analyses.app.launch`) and exit
    with their result."""
    if value is None or value <= 1 or ctx.resilient_parsing:
        return
    from analyses.app.launch import launch, strip_nproc

    argv = strip_nproc(list(ctx.meta.get("interp.argv", sys.argv))[1:])
    ctx.exit(launch(argv, value))


@click.group("interp", cls=InterpGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                          "max_content_width": 100})
@click.version_option(package_name="interp", prog_name="interp")
@click.option("--nproc", type=click.IntRange(min=1), default=None, expose_value=False,
              is_eager=False, callback=_launch,
              help="Run the command as N local processes that share the work "
                   "(torch.distributed, like torchrun --nproc-per-node N): heads, moe, ffn, "
                   "masking, patch, report.")
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
