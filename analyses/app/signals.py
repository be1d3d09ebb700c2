"""Stop signals: SIGTERM and SIGHUP stop a run the way Ctrl-C does, and wait where they must.

Two tools, for two owners:

- the command line (:func:`analyses.app.cli.main`, which owns its process) installs
  :func:`raise_interrupted` with :func:`handle_stop_signals`: the first stop signal raises
  :class:`Interrupted` (a :class:`KeyboardInterrupt`) wherever the program is, so every
  clean-up that runs for Ctrl-C (the report's temporary folder, the ``--out`` lock) runs for
  SIGTERM and SIGHUP too;
- the report writer wraps renames and clean-up in :func:`signals_held`, which works under
  any handler (a library caller's too): a signal that arrives meanwhile is delivered when
  the block ends, so a report is never stranded half-way between two names.

Exit codes follow the shell: 128 + the signal number, so 130 for SIGINT (Ctrl-C), 143 for
SIGTERM, 129 for SIGHUP. 143 rather than 130 for SIGTERM because that is what a shell,
``timeout``, systemd or a batch system expect from a run stopped by SIGTERM, and it tells
them apart from a Ctrl-C. SIGKILL cannot be handled: what it leaves behind, the next run on
that folder removes (:mod:`analyses.app.outdir`).

Standard library only, and nothing happens at import: the command line loads this before
its heavy imports, and a library importer's signal handling is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "Interrupted", "handle_stop_signals", "raise_interrupted",
           "redeliver_swallowed", "signals_held"]

# The signals that ask a run to stop politely (SIGHUP: the terminal went away).
STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where the program was by :func:`raise_interrupted`.

    A :class:`KeyboardInterrupt`, so all code that cleans up after Ctrl-C does so for the
    other stop signals too; :attr:`exit_code` is 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # stop signals seen by raise_interrupted, in this process


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """The command line's handler. The first stop signal raises :class:`Interrupted`; a
    second one while the run cleans up means "now": one line ``interrupted`` and exit at
    once (whatever that leaves, the next run on the same ``--out`` removes)."""
    _received.append(signum)
    if len(_received) > 1:
        os.write(2, b"interrupted\n")
        os._exit(128 + signum)
    raise Interrupted(signum)


def redeliver_swallowed(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A ``sys.unraisablehook`` that sends again a stop signal Python swallowed.

    Python cannot raise an exception out of a weakref callback or a ``__del__`` (the import
    system runs such callbacks all the time), so an :class:`Interrupted` raised there is
    printed as "Exception ignored" and dropped, and the run would go on as if nothing had
    been pressed. This hook forgets that delivery and has the signal sent again a moment
    later from another thread, so it lands in ordinary code; other unraisable exceptions go
    to ``previous``. Installed by the command line's ``main()`` only.
    """

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, Interrupted) and exc.signum in _received:
            _received.remove(exc.signum)  # not handled: the next delivery is the first
            timer = threading.Timer(0.01, os.kill, (os.getpid(), exc.signum))
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)

    return hook


def handle_stop_signals(handler: Callable[[int, FrameType | None], Any] | int) -> None:
    """Set ``handler`` for every stop signal that is not ignored.

    An ignored signal stays ignored: ``nohup`` and background jobs ignore SIGHUP/SIGINT on
    purpose. Main thread only (Python's rule for ``signal.signal``).
    """
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Run the body with the stop signals held back, then deliver what arrived.

    Used around renames and clean-up, which must not stop half-way. Python handles signals
    in the main thread only, so elsewhere there is nothing to hold. The handlers are swapped
    for a recorder rather than the signals blocked (``pthread_sigmask``) because the kernel
    hands a signal blocked in one thread to another (torch starts several), and Python then
    runs the handler in the main thread all the same. On exit the previous handlers are put
    back and each signal that arrived is raised again, so it is handled as it would have
    been (a :class:`KeyboardInterrupt`, the default action, ...).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not None:  # None: a handler Python cannot put back
                previous[sig] = signal.signal(sig, record)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)
