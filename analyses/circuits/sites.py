"""What can be patched: kinds of sites, their hook points and which dimensions index a site.

A *kind* names a hook point per layer, the activation's dimensions after the batch dimension,
and the dimensions that pick one site (``keep``); the others are patched (activation
patching) or summed (attribution patching) whole. So ``head`` patches ``hook_z`` of one head
at every position, ``head_pos`` one head at one position, ``resid_pre`` the residual stream at
one position. Patching ``hook_z`` is patching the head's output: the output projection is
linear and the same in both runs.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from interp.errors import InterpError

__all__ = ["KINDS", "Kind", "Site", "resolve", "sites"]


@dataclass(frozen=True)
class Kind:
    """One kind of site: ``hook`` has ``{layer}`` unless ``layered`` is false (a raw name)."""

    hook: str
    dims: tuple[str, ...]  # activation dimensions after batch
    keep: tuple[str, ...]  # the dimensions that index a site, in output-column order
    layered: bool = True


KINDS: dict[str, Kind] = {
    "resid_pre": Kind("blocks.{layer}.hook_resid_pre", ("pos", "d_model"), ("pos",)),
    "resid_mid": Kind("blocks.{layer}.hook_resid_mid", ("pos", "d_model"), ("pos",)),
    "resid_post": Kind("blocks.{layer}.hook_resid_post", ("pos", "d_model"), ("pos",)),
    "attn_out": Kind("blocks.{layer}.hook_attn_out", ("pos", "d_model"), ("pos",)),
    "mlp_out": Kind("blocks.{layer}.hook_mlp_out", ("pos", "d_model"), ("pos",)),
    "head": Kind("blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("head",)),
    "head_pos": Kind("blocks.{layer}.attn.hook_z", ("pos", "head", "d_head"), ("pos", "head")),
    "q": Kind("blocks.{layer}.attn.hook_q", ("pos", "head", "d_head"), ("head",)),
    "k": Kind("blocks.{layer}.attn.hook_k", ("pos", "head", "d_head"), ("head",)),
    "v": Kind("blocks.{layer}.attn.hook_v", ("pos", "head", "d_head"), ("head",)),
    "pattern": Kind("blocks.{layer}.attn.hook_pattern", ("head", "q_pos", "k_pos"), ("head",)),
    "neuron": Kind("blocks.{layer}.mlp.hook_post", ("pos", "neuron"), ("neuron",)),
}


@dataclass(frozen=True)
class Site:
    """One patch: the hook it touches, its labels for the output table, and the index into
    the activation after the batch dimension (a slice for every dimension not kept)."""

    hook: str
    labels: dict
    index: tuple


def resolve(model, what: str, layers: Sequence[int] | None = None) -> tuple[Kind, list]:
    """The kind ``what`` names and its ``(layer, hook name)`` list. ``what`` is a kind of
    :data:`KINDS` or a full hook name (patched position by position)."""
    if what in KINDS:
        kind = KINDS[what]
        layer_ids = range(model.cfg.n_layers) if layers is None else layers
        hooks = [(int(layer), kind.hook.format(layer=int(layer))) for layer in layer_ids]
        missing = [h for _, h in hooks if h not in model.hook_dict]
        if missing:
            raise InterpError(f"This model has no hook point {missing[0]} for kind {what!r} "
                              "(an attention-only or parallel block?); choose another kind from "
                              f"{', '.join(KINDS)} or pass layers= that exist.")
        return kind, hooks
    if "hook_" in what:
        model.check_hook_names([what])  # HookNameError (an InterpError) naming close names
        found = re.search(r"blocks\.(\d+)\.", what)
        return Kind(what, ("pos",), ("pos",), layered=False), [
            (int(found.group(1)) if found else -1, what)]
    raise InterpError(f"Unknown patching target {what!r}; use one of {', '.join(KINDS)} or a "
                      "full hook name from model.hook_dict.")


def sites(kind: Kind, layer: int, hook: str, shape: Sequence[int],
          positions: Sequence[int] | None = None) -> Iterator[Site]:
    """Every site of ``kind`` in an activation of ``shape`` (after batch). For a raw hook name
    only the position (first) dimension is kept, the rest patched whole."""
    dims = kind.dims if kind.layered else ("pos",) + tuple(f"d{i}" for i in range(len(shape) - 1))
    if len(dims) != len(shape):
        raise InterpError(f"Hook {hook} has shape {tuple(shape)}, not the {len(dims)} dimensions "
                          f"{dims} expected; patch it by its full hook name instead.")
    ranges = []
    for d in kind.keep:
        n = shape[dims.index(d)]
        if d == "pos" and positions is not None:
            ranges.append([p % n for p in positions])
        else:
            ranges.append(range(n))
    for values in itertools.product(*ranges):
        at = dict(zip(kind.keep, values, strict=True))
        index = tuple(at.get(d, slice(None)) for d in dims)
        yield Site(hook, {"layer": layer, **at}, index)
