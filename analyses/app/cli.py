"""The ``interp`` command line: its entry point, its error contract and the names commands use.

Reading order of the app layer, top-down:

- this module: :func:`main` (the console script, ``interp = "analyses.app.cli:main"``, and
  ``python -m analyses.app.cli``), and the names topic modules import from here: :data:`cli`
  (the click group, :mod:`analyses.app.group`), :class:`CliError`, and what every command
  shares from :mod:`analyses.app.common` (options, model loading, the report folder);
- :mod:`analyses.app.group`: the group and how errors reach the user
  (:mod:`~analyses.app.errors`); :mod:`~analyses.app.signals`: how stop signals do;
- the built-in commands :mod:`~analyses.app.info_cmd`, :mod:`~analyses.app.plot_cmd` and
  :mod:`~analyses.app.report_cmd`; the topic commands and report sections in
  :mod:`analyses.app.sections` (topics add commands with ``@cli.command(...)`` or
  ``cli.add_command(...)``; see there for discovery);
- :mod:`analyses.app.report` (the report folder) with :mod:`~analyses.app.outdir` (its
  lock and atomic replace), :mod:`~analyses.app.render` (its pages),
  :mod:`~analyses.app.plots` (figures) and :mod:`~analyses.app.paths` (no machine paths in
  a report).

Error contract (DESIGN.md, "Command line"): bad input prints ONE line ``error: <message>``
on stderr and exits with code 2, never a traceback; Ctrl-C prints ``interrupted`` and
exits 130. The report writer builds in a temporary folder, so neither leaves a half-
written report behind. Real bugs (anything not listed in :data:`USER_ERRORS`) still show
their traceback, and ``INTERP_DEBUG=1`` shows it for user errors too.

Signals (issue 24): SIGTERM and SIGHUP stop a run the way Ctrl-C does (the temporary folder
and the ``--out`` lock are cleaned up, one line ``interrupted``), with the shell's exit code
128 + the signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP (see
:mod:`analyses.app.signals` for why 143). Ctrl-C during start-up is covered: this module
imports only the standard library, :func:`main` installs the handlers first, and
everything else (click, torch, pandas, matplotlib, the commands, the topics) loads after,
inside the error handling. A signal that lands while the Python interpreter itself starts,
before the first line of interp runs (tens of milliseconds), meets Python's own handling.
Two runs on one ``--out`` cannot both write it: see :mod:`analyses.app.outdir`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from analyses.app.signals import (
    Interrupted,
    handle_stop_signals,
    raise_interrupted,
    redeliver_swallowed,
    signals_held,
)

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
    from analyses.app.errors import USER_ERRORS, CliError
    from analyses.app.group import cli
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

_FROM_COMMON = frozenset({"DEFAULT_MODEL", "common_options", "load_model", "model_argument",
                          "prepare_out", "resolve_device", "write_report"})


def __getattr__(name: str) -> Any:
    """The names above, imported on first use (PEP 562).

    Why lazily: they pull in click, torch, pandas and matplotlib (seconds), and :func:`main`
    must install its signal handlers before any of that. ``progress_for`` is the progress
    callable for a command's ``--quiet``: the one tqdm bar of
    :func:`interp.progress.progress_bar`, kept under this name for the topic modules.
    """
    if name in _FROM_COMMON:
        from analyses.app import common

        value = getattr(common, name)
    elif name in ("USER_ERRORS", "CliError"):
        from analyses.app import errors

        value = getattr(errors, name)
    elif name == "cli":
        from analyses.app.group import cli

        value = cli
    elif name == "progress_for":
        from interp.progress import progress_bar

        value = progress_bar
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def main() -> None:
    """Console-script entry point (``interp = "analyses.app.cli:main"``).

    Installs the stop-signal handlers first (here, never at import: the app owns the
    process, a library importer does not), and a hook that re-sends a signal Python
    swallowed in a callback (:func:`~analyses.app.signals.redeliver_swallowed`), then loads
    and runs the group. Once the command
    has finished, a late signal gets the default action (the process ends by that signal,
    which the shell reports as 128 + its number) rather than a traceback from the
    interpreter's shutdown.
    """
    try:
        # inside the try: a signal can land between installing SIGINT's handler and the
        # next signal's (the test sees the handlers and signals at once)
        handle_stop_signals(raise_interrupted)
        sys.unraisablehook = redeliver_swallowed(sys.unraisablehook)
        # Figures are written to files; never open a window or need a display.
        os.environ.setdefault("MPLBACKEND", "Agg")
        # torch's C++ start-up (c10d init) calls back into Python: an Interrupted raised in
        # there escapes as a C++ exception and aborts the process (SIGABRT and a C++ trace,
        # seen once under load). Stop signals wait while torch loads (a second or two), then
        # land here as usual.
        with signals_held():
            import torch  # noqa: F401
        # MKL's strict reproducible mode must be chosen before its first product, and is
        # process-wide: the command owns its process, so it is chosen here (on Intel CPUs the
        # linears then take MKL, 12-16% faster than oneDNN there, with thread-count-independent
        # sums; interp.perf.kernels.use_reproducible_mkl).
        from interp.perf.kernels import use_reproducible_mkl

        use_reproducible_mkl()
        from analyses.app.group import cli

        code = cli.main(prog_name="interp", standalone_mode=False)
        _flush()
        handle_stop_signals(signal.SIG_DFL)
    except KeyboardInterrupt as e:  # landed outside the group's own handling
        sys.stderr.write("interrupted\n")
        code = e.exit_code if isinstance(e, Interrupted) else 130
    sys.exit(code)


def _flush() -> None:
    """Flush stdout and stderr while a signal can still be handled (see :func:`main`)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    main()
