"""The one progress-bar convention: what long loops take, and the tqdm bar the commands pass.

Analyses never print. A long loop takes an optional ``progress`` callable with the signature
``progress(iterable, desc="", total=None) -> iterable`` and iterates what it returns; library
callers pass nothing (:func:`no_progress`), the command line passes :func:`progress_bar`
(tqdm on stderr, gone when done, silent under ``--quiet``). tqdm is imported only when a bar
is made, so ``import interp`` stays cheap.

>>> from interp.progress import no_progress, progress_bar
>>> list(no_progress(range(3), desc="ignored"))
[0, 1, 2]
>>> list(progress_bar(quiet=True)(range(3), desc="silent", total=3))
[0, 1, 2]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["Progress", "no_progress", "progress_bar"]

T = TypeVar("T")


class Progress(Protocol):
    """A wrapper around an iterable that may show progress; it must yield the same items."""

    def __call__(self, iterable: Iterable[T], *, desc: str = "",
                 total: int | None = None) -> Iterable[T]: ...


def no_progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None) -> Iterable[T]:
    """The identity :class:`Progress`: the iterable itself, nothing shown."""
    return iterable


def progress_bar(quiet: bool = False) -> Progress:
    """A :class:`Progress` drawing a tqdm bar on stderr (``leave=False``), or nothing when
    ``quiet``: the same bar every command shows."""

    def bar(iterable: Iterable[T], *, desc: str = "", total: int | None = None) -> Iterator[T]:
        from tqdm.auto import tqdm  # lazy: tqdm is only needed once a bar is drawn

        return iter(tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False,
                         file=sys.stderr, dynamic_ncols=True))

    return bar
