"""Timing: interleaved, rotated rounds against plain transformers without hooks.

Tools run interleaved after warm-up, the reference (plain transformers without hooks) and
every tool in an order rotated each round; every ratio is the median over rounds of (tool time
/ that round's reference time), so slow drifts of the machine cancel. On CUDA calls are timed
with CUDA events.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.ways import Way

_REF = "reference (transformers, no hooks)"


def _time(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call takes: CUDA events on a GPU, the wall clock on the CPU."""
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def time_workload(
    ways: dict[str, Way],
    workload: str,
    tokens: torch.Tensor,
    *,
    rounds: int,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Interleaved rounds (the reference and every tool, in an order rotated each round); per
    tool the median seconds and the median per-round ratio to plain transformers without hooks
    (the reference every target is stated against). ``order`` records each round's order."""
    ref = ways["transformers"].run["no_hooks"]
    active = {n: w.run[workload] for n, w in ways.items() if workload in w.run}
    for _ in range(warmup):
        ref(tokens)
        for fn in active.values():
            fn(tokens)
    times: dict[str, list[float]] = {n: [] for n in active}
    ratios: dict[str, list[float]] = {n: [] for n in active}
    refs: list[float] = []
    names = list(active)
    slots = [_REF, *names]
    orders = [slots[i % len(slots):] + slots[:i % len(slots)] for i in range(rounds)]
    for order in orders:
        # the reference takes its turn in the rotation too: a position effect (a run just after
        # another measured 1.02-1.07x against itself on the shared VM) then falls on every slot
        # equally instead of always favouring the reference
        got: dict[str, float] = {}
        for n in order:
            fn = ref if n == _REF else active[n]
            gc.collect()
            got[n] = _time(lambda fn=fn: fn(tokens), device)
        refs.append(got[_REF])
        for n in names:
            times[n].append(got[n])
            ratios[n].append(got[n] / got[_REF])
    res: dict[str, Any] = {
        "shape": list(tokens.shape),
        "rounds": rounds,
        "reference_s": statistics.median(refs),
        "medians_s": {n: statistics.median(v) for n, v in times.items()},
        "ratio_vs_plain_transformers": {n: statistics.median(v) for n, v in ratios.items()},
        "order": orders,
    }
    if "interp" in times:
        _interp_ratios(res, times, workload)
    return res


def _interp_ratios(res: dict[str, Any], times: dict[str, list[float]], workload: str) -> None:
    """Add interp's median per-round ratio to each other tool, and to transformers' reference."""
    for n in times:
        if n != "interp":
            pair = [a / b for a, b in zip(times["interp"], times[n], strict=True)]
            res[f"ratio_interp_vs_{n}"] = statistics.median(pair)
    if workload != "no_hooks":
        res["ratio_interp_vs_transformers"] = res["ratio_vs_plain_transformers"]["interp"]
    else:
        res["ratio_interp_vs_transformers"] = res.get("ratio_interp_vs_transformers")
