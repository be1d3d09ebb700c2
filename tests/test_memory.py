"""interp.keep_freed_memory: freed memory is reused instead of faulted back in (no timing)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys, torch
import interp
if sys.argv[1] == "keep":
    assert interp.keep_freed_memory()
def round_():
    # ten 20 MB tensors alive at once, like a cache of intermediates, then all freed
    kept = [torch.ones(5 * 1024 * 1024) for _ in range(10)]
    del kept
round_(); round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# glibc's default thresholds move with the sizes it has seen (a freed mmapped block raises the
# mmap threshold up to 32 MiB), and small allocations landing above freed heap blocks keep them
# from being trimmed, so whether a pass refaults its memory varies from run to run. These pin
# glibc's initial thresholds (128 KiB) so that the baseline maps and unmaps every large block
# each time and the comparison cannot flake.
_TRIMMING = {
    "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072:glibc.malloc.mmap_threshold=131072"
}


def _faults(mode: str) -> int:
    import os

    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **_TRIMMING},
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_removes_refaults() -> None:
    default, kept = _faults("default"), _faults("keep")
    # 200 MB re-allocated: the default allocator trims and faults ~50k pages back in
    assert default > 20_000
    # heap fragmentation can leave one 20 MB block to fault in again (5,120 pages)
    assert kept < default / 5


_CACHE_PROBE = r"""
import resource, sys, torch
import interp
from interp.perf.memory import retained_limit
torch.manual_seed(0)
# d_vocab 8192: the 8 x 256 logits (67 MB) are over glibc's largest mmap threshold (32 MiB)
cfg = interp.ModelConfig(n_layers=4, d_model=256, n_heads=4, d_vocab=8192, n_ctx=256,
                         positional="rope", act="swiglu", norm="rmsnorm")
model = interp.build_model(cfg).eval()
tokens = torch.randint(0, 8192, (8, 256))
def round_():
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return sum(v.numel() * v.element_size() for v in cache.values())
nbytes = round_(); round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, nbytes, retained_limit())
"""


def _cache_faults(env: dict[str, str]) -> tuple[int, int, int | None]:
    import os

    out = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **_TRIMMING, **env},
    )
    faults, nbytes, limit = out.stdout.strip().splitlines()[-1].split()
    return int(faults), int(nbytes), None if limit == "None" else int(limit)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_run_with_cache_reuses_its_own_memory_when_opted_in() -> None:
    """Opted in, a recorded cache's memory is kept for the next recording, bounded by its size;
    INTERP_REUSE_CACHE_MEMORY=0 restores glibc's trimming."""
    default_faults, nbytes, limit = _cache_faults({"INTERP_REUSE_CACHE_MEMORY": "1"})
    off_faults, _, off_limit = _cache_faults({"INTERP_REUSE_CACHE_MEMORY": "0"})
    assert off_limit is None
    # bounded: twice the cache's unique storage bytes (views share storage), at most
    assert limit is not None and nbytes <= limit <= 2 * nbytes
    assert off_faults > 50_000  # the ~280 MB cache and the 67 MB logits faulted in afresh
    # logits included: without recording() they alone would fault ~16,400 pages back in
    assert default_faults < 8_000


def test_note_recorded_never_lowers_and_ignores_small_caches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from interp.perf import memory

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(
        memory, "_libc_mallopt", lambda: lambda opt, val: calls.append((opt, val)) or 1
    )
    monkeypatch.setattr(memory, "_trim_set", None)
    monkeypatch.setattr(memory, "_auto", True)
    assert not memory.note_recorded(1024)  # small: glibc's dynamic threshold already keeps it
    assert memory.note_recorded(100 << 20)
    assert memory.retained_limit() == 200 << 20
    assert not memory.note_recorded(50 << 20)
    assert not memory.note_recorded(100 << 20)
    assert memory.note_recorded(3 << 31)  # capped at what mallopt takes
    assert memory.retained_limit() == 2**31 - 1
    memory.reuse_recorded_memory(False)
    monkeypatch.setattr(memory, "_trim_set", None)
    assert not memory.note_recorded(100 << 20)
    assert calls[0] == (memory._M_TRIM_THRESHOLD, 200 << 20)


def test_recording_serves_large_blocks_from_the_heap_only_once_a_threshold_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from interp.perf import memory

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(
        memory, "_libc_mallopt", lambda: lambda opt, val: calls.append((opt, val)) or 1
    )
    monkeypatch.setattr(memory, "_auto", True)
    monkeypatch.setattr(memory, "_trim_set", None)
    with memory.recording():
        pass
    assert calls == []  # no recording measured yet: glibc's defaults stand
    monkeypatch.setattr(memory, "_trim_set", 64 << 20)
    with memory.recording():
        with memory.recording():  # nested: set once, restored once, at the outermost exit
            assert calls == [(memory._M_MMAP_MAX, 0)]
        assert calls == [(memory._M_MMAP_MAX, 0)]
    assert calls == [(memory._M_MMAP_MAX, 0), (memory._M_MMAP_MAX, memory._DEFAULT_MMAP_MAX)]
    with pytest.raises(RuntimeError), memory.recording():
        raise RuntimeError("a failing forward still restores glibc's default")
    assert calls[-1] == (memory._M_MMAP_MAX, memory._DEFAULT_MMAP_MAX) and memory._depth == 0
