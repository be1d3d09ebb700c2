"""The whole run: every workload for every model, as one JSON-able result.

For each model the timed workloads share one process (the four ways built once, checked for
equivalence, then timed); long-context and streaming workloads each start one process per tool
(:func:`bench.memory.run_isolated`). A model or peer that cannot be loaded is skipped with a
note in ``result["notes"]`` instead of ending the run.
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.equivalence import check_equivalence
from bench.memory import run_isolated
from bench.models import MODELS, TOOLS, WORKLOADS, build_hf
from bench.timing import time_workload
from bench.ways import build_ways

TIMED = ("no_hooks", "attn_mlp", "patterns", "cache_all")


def machine() -> dict[str, Any]:
    """Versions, CPU and thread count, recorded with every result."""
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import transformer_lens

        info["transformer_lens"] = getattr(transformer_lens, "__version__", "4.x")
    except ImportError:
        pass
    try:
        import nnsight

        info["nnsight"] = nnsight.__version__
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    return info


def run_bench(
    *,
    models: tuple[str, ...] = MODELS,
    workloads: tuple[str, ...] = WORKLOADS,
    tools: tuple[str, ...] = TOOLS,
    rounds: int = 7,
    device: str = "cpu",
    long_tokens: int = 4096,
    progress: Callable[[str], None] = print,
    seed: int = 0,
) -> dict[str, Any]:
    """Every workload for every model; returns the JSON-able result (see :mod:`bench`)."""
    result: dict[str, Any] = {
        "machine": machine(),
        "device": device,
        "notes": [],
        "workloads": {w: {} for w in workloads},
    }
    timed = [w for w in workloads if w in TIMED]
    for model in models:
        if timed and not _timed(result, model, timed, tools, rounds, device, progress, seed):
            continue
        for wl in ("long_context", "streaming"):
            if wl in workloads:
                result["workloads"][wl][model] = _isolated(
                    model, wl, tools, device, long_tokens, progress, seed
                )
    return result


def _timed(
    result: dict[str, Any],
    model: str,
    timed: list[str],
    tools: tuple[str, ...],
    rounds: int,
    device: str,
    progress: Callable[[str], None],
    seed: int,
) -> bool:
    """The timed workloads of one model into ``result``; False when the model cannot load."""
    progress(f"[{model}] loading four ways")
    try:
        hf, tok, folder = build_hf(model, seed=seed)
    except Exception as e:  # a missing package for the real model: skip it with a note
        result["notes"].append(f"{model}: skipped ({e})")
        return False
    hf.to(device)
    ways, notes = build_ways(hf, tok, folder, tools)
    for w in ways.values():
        if hasattr(w, "model"):
            w.model.to(device)
    result["notes"] += [f"{model}: {n}" for n in notes]
    gen = torch.Generator().manual_seed(seed)
    vocab = hf.config.vocab_size
    small = torch.randint(0, vocab, (2, 16), generator=gen).to(device)
    equivalence = result.setdefault("equivalence_max_abs_diff", {})
    equivalence[model] = check_equivalence(ways, small, atol=1e-3)
    big = torch.randint(0, vocab, (8, 128), generator=gen).to(device)
    tiny = torch.randint(0, vocab, (1, 8), generator=gen).to(device)
    for wl in timed:
        progress(f"[{model}] {wl}")
        entry = time_workload(ways, wl, big, rounds=rounds, device=device)
        if wl == "no_hooks":
            entry["per_call_1x8"] = time_workload(
                ways, wl, tiny, rounds=rounds * 5, warmup=3, device=device
            )
            entry["ratio_interp_vs_transformers"] = entry["ratio_vs_plain_transformers"].get(
                "interp"
            )
        result["workloads"][wl][model] = entry
    del ways, hf
    gc.collect()
    return True


def _isolated(
    model: str,
    wl: str,
    tools: tuple[str, ...],
    device: str,
    long_tokens: int,
    progress: Callable[[str], None],
    seed: int,
) -> dict[str, Any]:
    """One memory workload of one model, each tool in its own process, with interp's ratios."""
    entry: dict[str, Any] = {}
    for tool in tools if wl == "long_context" else ("interp",):
        progress(f"[{model}] {wl}: {tool} (own process)")
        spec = {"model": model, "tool": tool, "workload": wl, "tokens": long_tokens,
                "seed": seed, "device": device}
        entry[tool] = run_isolated(spec)
    try:
        if wl == "long_context":
            ours, tl = entry["interp"]["no_patterns"], entry["transformer_lens"]["no_patterns"]
            entry["memory_ratio_interp_vs_transformer_lens"] = (
                ours["peak_mib"] / max(tl["peak_mib"], 1e-9)
            )
            theirs = entry["transformers"]["no_patterns"]
            entry["ratio_interp_vs_transformers"] = ours["seconds"] / theirs["seconds"]
        else:
            s = entry["interp"]
            entry["memory_ratio_10x_vs_1x"] = s["10x"]["peak_mib"] / max(s["1x"]["peak_mib"], 1e-9)
    except (KeyError, TypeError):
        pass
    return entry
