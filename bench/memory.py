"""Peak memory: one call's high-water mark, measured in a fresh process per (tool, workload).

On the CPU the peak is the process high-water mark (VmHWM) reset just before the measured call
(Linux ``clear_refs``), so each measurement runs in its own process (:func:`run_isolated`
starts :mod:`bench.worker`). With ``device="cuda"`` it is PyTorch's peak allocated device
memory over the call, timed with CUDA events.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.timing import _time

# the folder that holds the bench package: the worker process imports bench from there
CHECKOUT = Path(__file__).resolve().parent.parent


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """(seconds, peak extra MiB) of one call: on the CPU VmHWM after minus VmRSS before; on CUDA
    PyTorch's peak allocated device memory minus what was allocated before, timed with events."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
        dt = _time(fn, device)
        return dt, max(torch.cuda.max_memory_allocated() - base_bytes, 0) / 2**20
    _reset_peak()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    del out
    return dt, max(peak - base, 0) / 1024


def run_isolated(spec: dict[str, Any], timeout: int = 1800) -> dict[str, Any]:
    """Run :func:`bench.worker.measure` in a fresh Python process so peak memory belongs to one
    measurement. The checkout is put first on the worker's PYTHONPATH: bench is not installed."""
    path = os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path},
    )
    if proc.returncode < 0:  # killed by a signal: SIGKILL is usually the kernel's OOM killer
        import signal

        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return {"error": f"killed by {name}{hint}"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
