"""Removing heads and experts for a while: the context managers ablation and pruning share.

A head is removed by a gate of 0 on its output (``model.set_head_gates``; Michel et al. 2019,
*Are Sixteen Heads Really Better than One?*). An expert is removed from its layer's router
(``model.set_expert_mask``; the router renormalises over the rest), but a layer always keeps
at least ``top_k`` experts, so removals past that are skipped and counted as such.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from interp import HookedTransformer
from interp.errors import InterpError

__all__ = ["Unit", "experts_removed", "heads_removed", "moe_layers", "n_effective"]

Unit = tuple[int, int]  # (layer, head) or (layer, expert)


@contextlib.contextmanager
def heads_removed(model: HookedTransformer, removed: Iterable[Unit]) -> Iterator[None]:
    """Gate the ``removed`` (layer, head) units to 0 inside the block; all gates off after."""
    cfg = model.cfg
    gates = torch.ones(cfg.n_layers, cfg.n_heads, device=model.device)
    for layer, h in removed:
        gates[layer, h] = 0.0
    model.set_head_gates(gates)
    try:
        yield
    finally:
        model.set_head_gates(None)


def moe_layers(model: HookedTransformer) -> list[int]:
    """The layers with experts (an InterpError when there are none)."""
    cfg = model.cfg
    layers = [layer for layer in range(cfg.n_layers) if cfg.n_experts and cfg.is_moe_layer(layer)]
    if not layers:
        raise InterpError("This model has no mixture-of-experts layers, so there are no experts "
                          "to mask.")
    return layers


def n_effective(model: HookedTransformer, removed: Sequence[Unit]) -> int:
    """How many of ``removed`` experts :func:`experts_removed` really removes (each layer keeps
    at least top_k experts)."""
    E, k = model.cfg.n_experts, model.cfg.experts_per_token
    per_layer: dict[int, set[int]] = {}
    for layer, e in removed:
        got = per_layer.setdefault(layer, set())
        if E - len(got) > k:
            got.add(e)
    return sum(len(v) for v in per_layer.values())


@contextlib.contextmanager
def experts_removed(model: HookedTransformer, removed: Iterable[Unit]) -> Iterator[None]:
    """Disable experts through ``model.set_expert_mask`` (the router renormalises over the rest);
    a layer never loses so many that fewer than top_k remain (those removals are skipped)."""
    E, k = model.cfg.n_experts, model.cfg.experts_per_token
    masks: dict[int, torch.Tensor] = {}
    for layer, e in removed:
        m = masks.setdefault(layer, torch.ones(E, dtype=torch.bool, device=model.device))
        if int(m.sum()) > k:
            m[e] = False
    for layer, m in masks.items():
        model.set_expert_mask(layer, m)
    try:
        yield
    finally:
        for layer in masks:
            model.set_expert_mask(layer, None)
