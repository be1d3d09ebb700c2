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


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_removes_refaults() -> None:
    default, kept = _faults("default"), _faults("keep")
    # 200 MB re-allocated: the default allocator trims and faults ~50k pages back in
    assert default > 20_000
    assert kept < default / 20
