"""How much memory a model needs per dtype and context length: its parameters, a full
activation cache, and one residual-stream hook (what ``interp activations`` stores per hook).

Parameters are counted exactly from the config (:func:`interp.config_memory.parameter_count`).
Activations are measured, not modelled: the model runs with every hook cached on two short
inputs (8 and 16 tokens), and the bytes each hook holds are fitted as ``a*T + b*T^2`` (the
quadratic part is attention scores and patterns), so every architecture variant, kernel and
optional hook the model has is counted as it really is. MoE expert hooks depend on routing;
their measured share is extrapolated linearly like the rest.
"""

from __future__ import annotations

from typing import Any

import torch

from interp.config_memory import parameter_count

__all__ = ["DTYPE_BYTES", "activation_fit", "memory_table"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_PROBE = (8, 16)


def _cache_elements(model: Any, T: int) -> tuple[int, int]:
    """(elements in a full run_with_cache of one sequence of T tokens, elements of one
    ``hook_resid_post``)."""
    tokens = torch.zeros((1, T), dtype=torch.long, device=model.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    total = sum(v.numel() for v in cache.values())
    resid = next((v.numel() for k, v in cache.items() if k.endswith("hook_resid_post")), 0)
    return total, resid


def activation_fit(model: Any) -> tuple[float, float, float]:
    """(a, b, r): a full cache of T tokens holds ``a*T + b*T^2`` elements, one residual hook
    ``r*T``; fitted from two forwards (8 and 16 tokens, batch 1)."""
    (t1, t2) = _PROBE
    (e1, r1), (e2, _) = (_cache_elements(model, t) for t in _PROBE)
    # e = a t + b t^2 at two points
    b = (e2 / t2 - e1 / t1) / (t2 - t1)
    a = e1 / t1 - b * t1
    return a, max(b, 0.0), r1 / t1


def _fmt(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def memory_table(model: Any, contexts: list[int] | None = None) -> list[dict[str, Any]]:
    """One row per (dtype, context): ``dtype``, ``context``, ``parameters_bytes``,
    ``full_cache_bytes`` (every hook of one sequence), ``resid_hook_bytes`` (one
    ``hook_resid_post`` of one sequence), and the same three as human-readable strings."""
    cfg = model.cfg
    if contexts is None:
        contexts = sorted({min(512, cfg.n_ctx), cfg.n_ctx})
    n_params = parameter_count(cfg)
    a, b, r = activation_fit(model)
    rows = []
    for dtype, size in DTYPE_BYTES.items():
        for T in contexts:
            row = {"dtype": dtype, "context": T, "parameters_bytes": n_params * size,
                   "full_cache_bytes": int((a * T + b * T * T) * size),
                   "resid_hook_bytes": int(r * T * size)}
            row.update({k[:-6]: _fmt(v) for k, v in list(row.items()) if k.endswith("_bytes")})
            rows.append(row)
    return rows
