"""config.json fields of the 2026 variants, read once for every family that has them.

transformers writes RoPE as ``rope_parameters`` (5.x: one dict, or one per layer type as Gemma
3's ``{"full_attention": {...}, "sliding_attention": {...}}``) or ``rope_scaling`` (4.x), and
per-layer attention as ``layer_types`` (``"full_attention"`` / ``"sliding_attention"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from interp.errors import InterpError
from interp.loading._common import hf_get
from interp.rope_scaling import ROPE_TYPES, RopeScaling

#: transformers' layer_types -> ours
LAYER_TYPES = {"full_attention": "global", "sliding_attention": "sliding"}


def rope_params(hf: Any, layer_type: str | None = None, default_theta: float = 10000.0
                ) -> tuple[float, RopeScaling | None]:
    """(RoPE base, scaling or None) of the config, or of one layer type's entry."""
    params = hf_get(hf, "rope_parameters") or hf_get(hf, "rope_scaling") or {}
    if not isinstance(params, Mapping):
        params = {}
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if theta is None:
        theta = hf_get(hf, "rope_theta", default_theta)
    if kind in ("default", None):
        return float(theta), None
    field = "rope_parameters" if hf_get(hf, "rope_parameters") else "rope_scaling"
    if kind not in ROPE_TYPES:
        raise InterpError(f"config.json field {field!r} has rope_type {kind!r}; supported: "
                          f"default, {', '.join(ROPE_TYPES)}.")
    scaling = dict(params)
    if kind in ("llama3", "yarn", "longrope") and "original_max_position_embeddings" not in scaling:
        omax = hf_get(hf, "original_max_position_embeddings") or hf_get(
            hf, "max_position_embeddings")
        scaling["original_max_position_embeddings"] = omax
    try:
        return float(theta), RopeScaling.from_dict(scaling)
    except ValueError as e:
        raise InterpError(f"config.json field {field!r}: {e}") from None


def layer_types(hf: Any, n_layers: int) -> tuple[str, ...] | None:
    """``layer_types`` in our words, or None when every layer is global."""
    raw = hf_get(hf, "layer_types")
    if not raw:
        return None
    bad = [t for t in raw if t not in LAYER_TYPES]
    if bad or len(raw) != n_layers:
        raise InterpError(f"config.json field 'layer_types' must list {n_layers} entries of "
                          f"{', '.join(LAYER_TYPES)}; got {list(raw)!r}.")
    out = tuple(LAYER_TYPES[t] for t in raw)
    return out if "sliding" in out else None
