"""Runs that start at different layers, batched as one growing stream of rows.

Causal tracing restores a clean state at one (layer, position) and recomputes the model from
that layer on; integrated gradients scale one layer's FFN activations and recompute from that
layer on. Run one forward per start layer and the batches are tiny (a few rows: SmolLM2's 30
layers give 30 start layers), so the matrix products run at a fraction of the CPU's speed.
:func:`staggered_forward` runs every row in one stream instead: rows are sorted by their start
layer, and at layer ``i`` the rows starting there join the batch (appended at the end, so a
row's index never changes). Each row still computes exactly its own layers, only batched with
the others: the result equals one forward per start layer up to float rounding.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

import torch

from analyses.ffn.readout import FwdHook, _final_norm
from interp import HookedTransformer, KVCache

#: ``entering(layer, lo, hi)``: the residual [hi - lo, pos, d_model] of rows lo..hi-1, which
#: start at ``layer``.
Entering = Callable[[int, int, int], torch.Tensor]
#: ``past(layer, n)``: keys and values [n, past_pos, kv_head, d_head] of the earlier
#: positions for the first ``n`` rows at ``layer``, or None when nothing comes before.
Past = Callable[[int, int], tuple[torch.Tensor, torch.Tensor] | None]
#: ``hooks(layer, n)``: the forward hooks of ``layer`` while the first ``n`` rows run.
LayerHooks = Callable[[int, int], list[FwdHook]]


def _layer_cache(n_layers: int, layer: int,
                 kv: tuple[torch.Tensor, torch.Tensor] | None) -> KVCache | None:
    """A KV cache holding only ``layer``'s earlier positions (layer 0's entry carries the same
    tensors, since the cache reads its length there; block 0 does not run)."""
    if kv is None:
        return None
    cache = KVCache(n_layers)
    cache.layers[layer].k, cache.layers[layer].v = kv
    if layer:
        cache.layers[0].k, cache.layers[0].v = kv
    return cache


def staggered_forward(model: HookedTransformer, starts: Sequence[int], tokens: torch.Tensor,
                      entering: Entering, past: Past, hooks: LayerHooks) -> torch.Tensor:
    """The final hidden states [rows, pos, d_model] (after the final norm) of rows that start
    at layers ``starts`` (ascending; ``n_layers`` = after the last block).

    ``tokens`` [rows, pos] are the ids of the computed positions (for shapes and positions;
    the residual comes from ``entering``); ``past`` gives the keys and values of the positions
    before them. Row ``r`` joins at layer ``starts[r]`` with ``entering``'s residual and then
    runs every later block with the rows already there.
    """
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError("staggered_forward needs rows sorted by start layer.")
    L = model.cfg.n_layers
    x: torch.Tensor | None = None
    n = 0
    for layer in range(starts[0], L + 1):
        m = bisect_right(starts, layer)
        if m > n:  # rows starting here join at the end of the batch
            new = entering(layer, n, m)
            x = new if x is None else torch.cat([x, new])
            n = m
        if layer == L:
            break
        assert x is not None  # the first row starts at or before this layer
        cache = _layer_cache(L, layer, past(layer, n))
        with model.hooks(fwd_hooks=hooks(layer, n)):
            x = model(tokens[:n], past_kv=cache, start_at_layer=layer, stop_at_layer=layer + 1,
                      residual=x, return_type="hidden")
    assert x is not None
    return _final_norm(model, x)
