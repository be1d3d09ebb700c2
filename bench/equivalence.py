"""Like with like: every way's outputs checked against plain transformers' before any timing.

The harness only times tools that compute the same thing, so :func:`check_equivalence` runs
the logits, every attention/MLP output and every pattern of each tool against transformers'
and raises on the first tensor that differs by more than float32 rounding at its own scale.
"""

from __future__ import annotations

import torch

from bench.ways import Way


@torch.no_grad()
def check_equivalence(
    ways: dict[str, Way], tokens: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-4
) -> dict[str, dict[str, float]]:
    """Max abs difference to transformers' outputs, per tool and workload; raises on a mismatch.

    The harness only times tools that compute the same thing: logits, every attention/MLP output
    and every pattern are compared before any timing. A tensor passes when its max abs difference
    is at most ``atol + rtol * max|reference|``: SmolLM2's massive activations (MLP outputs up to
    ~26,000 in layer 11) differ by float32 rounding alone by ~0.03 between GEMM kernels (1.3e-6 of
    their scale), while a changed weight moves outputs by a sizeable fraction of theirs."""
    ref = ways["transformers"]
    out: dict[str, dict[str, float]] = {}
    for name, w in ways.items():
        if name == "transformers":
            continue
        out[name] = {}
        for wl in ("no_hooks", "attn_mlp", "patterns"):
            if wl not in w.run:
                continue
            a, b = ref.run[wl](tokens), w.run[wl](tokens)
            a = a if isinstance(a, list) else [a]
            b = b if isinstance(b, list) else [b]
            if len(a) != len(b):
                raise AssertionError(f"{name} {wl}: {len(b)} tensors, transformers gives {len(a)}")
            out[name][wl] = _worst_diff(name, wl, a, b, atol, rtol)
    return out


def _worst_diff(
    name: str, wl: str, a: list[torch.Tensor], b: list[torch.Tensor], atol: float, rtol: float
) -> float:
    """The largest max abs difference over paired tensors; raises on one past its bound."""
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        xf = x.float()
        diff = float((xf - y.float()).abs().max())
        bound = atol + rtol * float(xf.abs().max())
        if diff > bound:
            raise AssertionError(
                f"{name} {wl}: tensor {i}: max abs diff {diff:.2e} to transformers exceeds "
                f"{bound:.2e} (atol {atol} + rtol {rtol} x its scale)"
            )
        worst = max(worst, diff)
    return worst
