"""The guard around a report folder: one writer at a time, nothing left behind by a dead run.

A report folder (``--out DIR``) is written as a hidden temporary folder ``.DIR.tmp-*`` next
to it and then renamed into place (:meth:`analyses.app.report.Report.write`). This module
holds what makes that safe when several runs, signals or a crash meet it:

- **One writer per folder** (:func:`out_lock`): an exclusive ``fcntl.flock`` on a lock file
  ``.DIR.lock`` next to the target, taken without waiting. A second run on the same DIR
  fails at once with one line ("another interp run is writing DIR") instead of silently
  replacing the first run's report. ``flock`` rather than a PID file because the kernel
  releases it when its process dies, however it dies: a SIGKILLed run never blocks the next
  one, and there is no PID to be reused. The lock file holds the owner's PID for people
  reading it and is removed (while still locked) when the lock is released, so a finished
  run leaves nothing; a killed run leaves an unlocked file that the next run simply takes.
  Where ``flock`` does not exist or the file system refuses it, runs go ahead unlocked,
  as they did before there was a lock.
- **Stale temporaries** (:func:`clean_stale`): once it holds the lock, a run removes
  ``.DIR.tmp-*`` and ``.DIR.old-*`` folders, which can only be left by dead runs (a live
  one would hold the lock); if a run died between the two renames of the fallback swap,
  DIR is missing and its previous report, ``.DIR.old-*``, is put back first.
- **Signals held** (:func:`analyses.app.signals.signals_held`): SIGINT, SIGTERM and
  SIGHUP wait while folders are renamed or removed, so a signal never strands a report
  half-way between two names.
- **Atomic replace** (:func:`swap_folders`): ``renameat2(RENAME_EXCHANGE)`` on Linux swaps
  the new and the previous report in one step, so DIR holds a complete report at every
  instant, even under SIGKILL or a power cut; elsewhere two renames, undone on error.
- **A test hook** (:func:`pause_point`): ``INTERP_TEST_PAUSE_AT=<point>`` makes the writer
  stop at a named point so tests can land signals there (see ``tests/test_signals.py``).

Nothing here runs at import time: no file is touched until a report is written. Standard
library only, so the command line's error handling can name :class:`ReportError` before
its heavy imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no flock; runs go ahead unlocked
    fcntl = None  # type: ignore[assignment]

from analyses.app.signals import signals_held

__all__ = ["ReportError", "clean_stale", "out_lock", "pause_point", "swap_folders"]


class ReportError(ValueError):
    """A report cannot be written as asked (existing folder, bad names, unwritable place,
    another run writing the same folder).

    The message is one line, meant to be shown to a user as is.
    """


# --------------------------------------------------------------------------- the lock

_HELD: dict[str, int] = {}  # lock file path -> id of the thread holding it
_HELD_GUARD = threading.Lock()


def _lock_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _owner(path: Path) -> str:
    """" (pid N)" from a lock file, best effort, for the message."""
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _try_lock(path: Path, out_dir: Path) -> int | None:
    """Open and lock ``path``; its descriptor, or None where locking is not supported.

    Loops because a finishing run unlinks its lock file while still holding it: a lock taken
    on a file that is no longer at ``path`` guards nothing, so open the new one and retry.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise ReportError(f"cannot write to {path.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReportError(
                f"another interp run{_owner(path)} is writing {out_dir}; wait for it to "
                f"finish or choose another --out (lock file {path.name})"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None  # this file system has no flock: go ahead unlocked
            raise ReportError(f"cannot lock {path}: {e.strerror or e}") from e
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # the PID is for people; the lock is the flock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)


def _created_parents(out_dir: Path) -> list[Path]:
    """Create the missing folders above ``out_dir``; return them, deepest first."""
    missing = []
    parent = out_dir.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot write to {out_dir.parent}: {e.strerror or e}") from e
    return missing


@contextlib.contextmanager
def out_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``out_dir`` (absolute) for the body; see the module docstring.

    Re-entrant within one thread: the command takes it before its slow work
    (:func:`analyses.app.common.prepare_out`) and the report writer again around the write.
    Taking it creates the missing folders above ``out_dir`` (the lock file lives there);
    they are removed again if no report was written. Stale temporaries of dead runs are
    cleaned once the lock is held. Raises :class:`ReportError` when another run holds it.
    """
    path = _lock_file(out_dir)
    key, me = str(path), threading.get_ident()
    with _HELD_GUARD:
        mine = _HELD.get(key) == me
    if mine:
        yield
        return
    fd = None
    created: list[Path] = []
    registered = False
    try:
        with signals_held():  # the lock file and the registry entry exist together or not
            created = _created_parents(out_dir)
            if fcntl is not None:
                fd = _try_lock(path, out_dir)
            with _HELD_GUARD:
                if _HELD.get(key) is not None:  # another thread, where flock is missing
                    raise ReportError(f"another interp run is writing {out_dir}")
                _HELD[key] = me
                registered = True
        clean_stale(out_dir)
        yield
    finally:
        with signals_held():
            if registered:
                with _HELD_GUARD:
                    del _HELD[key]
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # still locked: nobody can take the old file meanwhile
                os.close(fd)
            if not out_dir.exists():
                for folder in created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break


# --------------------------------------------------------------------------- stale folders


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    """The ``.DIR.<kind>-XXXXXXXX`` folders ``tempfile.mkdtemp`` made for ``out_dir``."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.{kind}-[A-Za-z0-9_]{{8}}$")
    try:
        entries = list(os.scandir(out_dir.parent))
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if pattern.match(e.name) and (e.is_symlink() or e.is_dir(follow_symlinks=False))]


def clean_stale(out_dir: Path) -> None:
    """Remove the temporary folders dead runs left next to ``out_dir``; call under the lock.

    A run that died between the two renames of the fallback swap left no ``out_dir`` and its
    previous report as ``.DIR.old-*``: that report is put back first (the newest, if several).
    """
    olds = sorted(_leftovers(out_dir, "old"), key=lambda p: p.lstat().st_mtime)
    with signals_held():
        if olds and not os.path.lexists(out_dir):
            os.rename(olds.pop(), out_dir)
        for folder in [*olds, *_leftovers(out_dir, "tmp")]:
            _remove(folder)


# --------------------------------------------------------------------------- the swap

RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # e.g. a file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    """Remove a folder, or the symlink that stood at ``--out`` (never what it points to)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def swap_folders(new: Path, out_dir: Path) -> None:
    """Put the complete folder ``new`` at ``out_dir``, replacing what is there.

    Signals are held throughout. The previous report is removed only once the new one is in
    place; on error it stays (or is put back) at ``out_dir``.
    """
    with signals_held():
        if not out_dir.exists():
            os.rename(new, out_dir)
            return
        if _exchange(new, out_dir):  # ``new`` now holds the previous report
            pause_point("swapped")
            _remove(new)
            return
        old = out_dir.parent / f".{out_dir.name}.old-{new.name[-8:]}"
        os.rename(out_dir, old)
        try:
            os.rename(new, out_dir)
        except BaseException:
            os.rename(old, out_dir)  # put the previous report back
            raise
        pause_point("swapped")
        _remove(old)


# --------------------------------------------------------------------------- test hook


def pause_point(name: str) -> None:
    """Stop here when a test asks: ``INTERP_TEST_PAUSE_AT`` names points (comma-separated).

    Points: ``locked`` (the lock held, before the temporary folder), ``writing`` (the
    temporary folder half written), ``renaming`` (complete, before the rename), ``swapped``
    (the new report in place, the previous one not yet removed; signals held there). The
    run prints ``paused at <name>`` on stderr, then waits until the file named by
    ``INTERP_TEST_PAUSE_UNTIL`` exists (or 60 s without it). A no-op unless set; for tests
    only, so they can land a signal at an exact point.
    """
    if name not in os.environ.get("INTERP_TEST_PAUSE_AT", "").split(","):
        return
    print(f"paused at {name}", file=sys.stderr, flush=True)
    until = os.environ.get("INTERP_TEST_PAUSE_UNTIL")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.02)
