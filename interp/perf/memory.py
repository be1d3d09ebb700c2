"""CPU memory reuse for repeated recording runs.

Recording a forward pass keeps its intermediates alive, so each recorded tensor needs memory the
allocator does not have free. With glibc's default settings a large freed block at the top of
the heap is handed back to the kernel (trimmed) as soon as the cache is dropped, and the next
pass has to fault the same memory back in, one zeroed 4 KiB page at a time. On a VM a fault
costs several microseconds: caching every hook point of SmolLM2-135M (8 x 128 tokens, 1.5 GB)
took ~420,000 faults and 2.0x the time of transformers' unhooked forward, against 1.17x once
the freed memory is reused (2-core VM, BENCHMARKS.md change 6). On GPUs PyTorch's caching
allocator already keeps freed blocks.

glibc's malloc parameters belong to the whole process, and changing them changes what the
process does outside interp (its resident memory stays at the peak it reached), so this is
opt-in: ``INTERP_REUSE_CACHE_MEMORY=1`` or ``reuse_recorded_memory(True)`` (``interp bench``
turns it on for its own process). Once on, interp keeps freed memory up to twice the largest
cache it has recorded: :func:`note_recorded` (called by ``run_with_cache``) raises glibc's
trim threshold to that
bound (the pass's transients sit on the heap next to the cache, so the freed top of the heap
is larger than the cache itself; with the cache's size alone glibc still trimmed in 2 of 8
runs), and while a later recording runs (:func:`recording`) blocks over 32 MiB, such as the
logits, come from that heap too instead of fresh mmaps. The process then stays resident at a
peak it already reached, but no higher. :func:`keep_freed_memory` sets a fixed, larger
threshold instead. Off (the default), interp never calls ``mallopt``. Where the C library
is not glibc (macOS, musl, Windows) nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable, Iterator

__all__ = [
    "keep_freed_memory",
    "note_recorded",
    "recording",
    "retained_limit",
    "reuse_recorded_memory",
    "reuses_recorded_memory",
]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's default number of simultaneous mmapped blocks
_MMAP_MAX = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit systems
_TRIM_MAX = 2**31 - 1  # mallopt takes an int
_MIN_AUTO = 16 * 1024 * 1024  # below this the default dynamic threshold already keeps it

_trim_set: int | None = None  # the trim threshold interp last set; None: glibc's defaults rule
_depth = 0  # nesting of recording() blocks
_ON = ("1", "true", "yes", "on")
_auto = os.environ.get("INTERP_REUSE_CACHE_MEMORY", "0").strip().lower() in _ON


@functools.cache
def _libc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, looked up once; None on other C libraries."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl has mallopt as a no-op
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _set_trim(limit: int) -> bool:
    global _trim_set
    mallopt = _libc_mallopt()
    if mallopt is None:
        return False
    limit = max(0, min(int(limit), _TRIM_MAX))
    # setting any threshold freezes glibc's dynamic mmap threshold, so pin it where the dynamic
    # rule would end up (32 MiB): blocks up to that size come from the reusable heap
    ok = bool(mallopt(_M_TRIM_THRESHOLD, limit)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX))
    if ok:
        _trim_set = limit
    return ok


def keep_freed_memory(limit: int = _TRIM_MAX) -> bool:
    """Make glibc keep up to ``limit`` bytes (default 2 GiB) of freed heap memory for reuse.

    Sets ``M_TRIM_THRESHOLD`` to ``limit`` and ``M_MMAP_THRESHOLD`` to 32 MiB (blocks up to
    32 MiB come from the reusable heap rather than fresh ``mmap`` regions). Returns True when
    applied, False where the C library is not glibc, in which case nothing changes. For a
    process that records caches of very different sizes, or memory freed outside interp's
    caches; recording through ``run_with_cache`` already keeps up to twice its largest cache.
    """
    return _set_trim(limit)


def reuse_recorded_memory(enabled: bool) -> None:
    """Turn the automatic reuse of recorded caches' memory on or off (off by default: it sets
    process-wide malloc parameters; ``INTERP_REUSE_CACHE_MEMORY=1`` starts it on). Turning it
    off does not undo a threshold already set; ``keep_freed_memory(0)`` trims everything again.
    """
    global _auto
    _auto = bool(enabled)


def reuses_recorded_memory() -> bool:
    """Whether recordings raise the trim threshold (the policy is on and the C library is glibc)."""
    return _auto and _libc_mallopt() is not None


def retained_limit() -> int | None:
    """The trim threshold interp has set (bytes of freed memory glibc keeps), or None."""
    return _trim_set


def note_recorded(nbytes: int) -> bool:
    """Tell the allocator policy that a cache of ``nbytes`` was recorded on the CPU.

    Raises glibc's trim threshold to ``2 * nbytes`` (capped at 2 GiB) when that is more than
    interp has set so far (never lowers it), so the next recording reuses this pass's memory
    once it is freed instead of faulting it in afresh. Returns True when the threshold changed."""
    limit = min(2 * int(nbytes), _TRIM_MAX)
    if not _auto or nbytes < _MIN_AUTO or (_trim_set is not None and limit <= _trim_set):
        return False
    return _set_trim(limit)


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Serve every block of a recording pass from the heap, so that the next pass reuses it.

    glibc maps blocks over its mmap threshold (at most 32 MiB) afresh and unmaps them on free,
    whatever the trim threshold: SmolLM2's 8 x 128 logits (201 MB) were faulted in on every
    cached pass (49,000 faults, ~0.2-0.4 s on a VM). Once :func:`note_recorded` has set a
    threshold, this sets ``M_MMAP_MAX`` to 0 for the block's duration (the heap grows
    instead; glibc still falls back to mmap where the heap cannot grow) and restores glibc's
    default (65536) when the outermost block ends. Outside recordings nothing changes."""
    global _depth
    mallopt = _libc_mallopt() if (_auto and _trim_set is not None) else None
    if mallopt is not None and _depth == 0:
        mallopt(_M_MMAP_MAX, 0)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if mallopt is not None and _depth == 0:
            mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
