"""Per-layer attention and the 2026 variants of :class:`interp.config.ModelConfig`.

Gemma 2/3, Qwen2 with ``max_window_layers``, Llama 3.x and Phi-3 differ from the one-attention
model in a handful of fields, normalised and validated here (one sentence per error, naming the
field and how to fix it), so a config that constructs runs:

- ``layer_types``: each layer ``"global"`` (the config's ``mask``) or ``"sliding"`` (``mask &
  sliding_window(W)``); ``None`` = all global. Hooks are the same on both kinds: a sliding
  layer's pattern is full size with the hidden part zero.
- ``rope_local_base``: sliding layers' RoPE base, unscaled (Gemma 3: 10,000 local, 1e6 global);
  ``None`` = every layer uses ``rope_base`` and ``rope_scaling``.
- ``rope_scaling``: a :class:`interp.rope_scaling.RopeScaling` (a dict is converted).
- ``attn_softcap`` / ``final_softcap``: ``cap * tanh(x / cap)`` on scores / logits.
- ``embed_scale``: token embeddings times a constant (Gemma: ``sqrt(d_model)``).
- ``norm_placement`` ``"sandwich"`` (a norm before and after each sub-layer, inside the
  residual branch: Gemma 2/3) and ``"post_branch"`` (only after: OLMo 2).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from interp.rope_scaling import as_rope_scaling

if TYPE_CHECKING:
    from interp.config import ModelConfig

LAYER_TYPES = ("global", "sliding")
#: softcaps above this never bend a float32 score; below 1e-3 every score is ~0
SOFTCAP_RANGE = (1e-3, 1e6)


def normalise_variants(cfg: ModelConfig) -> None:
    """Lists to tuples, a ``rope_scaling`` dict to a RopeScaling (checked as it is built)."""
    lt = cfg.layer_types
    if isinstance(lt, list):
        object.__setattr__(cfg, "layer_types", tuple(lt))
    object.__setattr__(cfg, "rope_scaling", as_rope_scaling(cfg.rope_scaling))


def _finite_positive(name: str, v: Any, lo: float = 0.0, hi: float | None = None) -> None:
    ok = (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
          and v > lo and (hi is None or v <= hi))
    if not ok:
        bound = f" in {lo:g}..{hi:g}" if hi is not None else " > 0"
        raise ValueError(f"{name} must be a finite number{bound}, got {v!r}.")


def check_variants(cfg: ModelConfig) -> None:
    """Per-layer attention, RoPE variants, soft-caps, embedding scale, norm placements."""
    _check_layer_types(cfg)
    _check_rope_variants(cfg)
    for name in ("attn_softcap", "final_softcap"):
        if getattr(cfg, name) is not None:
            _finite_positive(name, getattr(cfg, name), *SOFTCAP_RANGE)
    if cfg.attn_softcap is not None and cfg.attn_kernel in ("sdpa", "linear"):
        raise ValueError(f"attn_softcap bends the scores, which attn_kernel={cfg.attn_kernel!r} "
                         "never forms; use attn_kernel='auto' or 'eager'.")
    _finite_positive("embed_scale", cfg.embed_scale, 0.0, 1e4)
    _check_learned_masks(cfg)
    if cfg.norm_placement in ("sandwich", "post_branch"):
        if cfg.norm == "none":
            raise ValueError(f"norm_placement={cfg.norm_placement!r} needs a norm; set "
                             "norm='rmsnorm' or 'layernorm'.")
        if cfg.parallel_attn_mlp:
            raise ValueError(f"norm_placement={cfg.norm_placement!r} is for sequential blocks; "
                             "set parallel_attn_mlp=False or norm_placement='pre'.")
        if cfg.architecture == "encoder_decoder":
            raise ValueError(f"norm_placement={cfg.norm_placement!r} is implemented for "
                             "decoder-only and encoder-only stacks; use 'pre' or 'post'.")


def _check_learned_masks(cfg: ModelConfig) -> None:
    """Adaptive span and selective attention edit the scores of a causal self-attention."""
    for name in ("adaptive_span", "l0_head_gates", "selective_attention"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}.")
    r = cfg.span_ramp
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 2**31:
        raise ValueError(f"span_ramp must be a positive integer (positions), got {r!r}.")
    for name in ("adaptive_span", "selective_attention"):
        if not getattr(cfg, name):
            continue
        if cfg.attn_kernel in ("sdpa", "linear"):
            raise ValueError(f"{name} edits the attention scores, which attn_kernel="
                             f"{cfg.attn_kernel!r} never forms; use attn_kernel='auto' or 'eager'.")
        hides_later = not bool(cfg.mask.build(8, 8).triu(diagonal=1).any())
        if cfg.architecture != "decoder" or not hides_later:
            raise ValueError(f"{name} counts back from each query, so it needs a causal decoder "
                             f"(architecture='decoder', a mask hiding later keys); got "
                             f"architecture={cfg.architecture!r}, mask={cfg.mask}.")


def _check_layer_types(cfg: ModelConfig) -> None:
    lt, w = cfg.layer_types, cfg.sliding_window
    if lt is None:
        if w is not None:
            raise ValueError("sliding_window applies to the layers layer_types marks 'sliding'; "
                             "set layer_types, or mask='causal&sliding_window:W' for every layer.")
        return
    if cfg.architecture == "encoder_decoder":
        raise ValueError("layer_types is implemented for decoder-only and encoder-only stacks; "
                         "remove it for encoder_decoder.")
    if not isinstance(lt, tuple) or len(lt) != cfg.n_layers:
        raise ValueError(f"layer_types must list one entry per layer ({cfg.n_layers}), "
                         f"got {lt!r}.")
    bad = [t for t in lt if t not in LAYER_TYPES]
    if bad:
        raise ValueError(f"Unknown layer_types entry {bad[0]!r}; valid values: "
                         f"{', '.join(LAYER_TYPES)}.")
    if "sliding" in lt:
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 2**62:
            raise ValueError(f"layer_types has sliding layers, so sliding_window must be a "
                             f"positive integer (keys with q - k < window), got {w!r}.")
        if cfg.attn_kernel == "linear":
            raise ValueError("Linear attention supports only causal or bidirectional masks; "
                             "sliding layers need attn_kernel='auto'.")
    elif w is not None:
        raise ValueError("sliding_window is set but no layer_types entry is 'sliding'; remove "
                         "it or mark the sliding layers.")


def _check_rope_variants(cfg: ModelConfig) -> None:
    rope = cfg.positional == "rope"
    if cfg.rope_scaling is not None:
        if not rope:
            raise ValueError(f"rope_scaling applies only to positional='rope' (got "
                             f"{cfg.positional!r}); remove it.")
        sc = cfg.rope_scaling
        for name in ("long_factor", "short_factor"):
            v = getattr(sc, name)
            if v is not None and len(v) != cfg.rotary_dim // 2:
                raise ValueError(f"rope_scaling {name} has {len(v)} entries; rotary_dim="
                                 f"{cfg.rotary_dim} needs {cfg.rotary_dim // 2}.")
    if cfg.rope_local_base is not None:
        if not rope or not cfg.layer_types or "sliding" not in cfg.layer_types:
            raise ValueError("rope_local_base is the RoPE base of sliding layers; it needs "
                             "positional='rope' and layer_types with 'sliding' entries.")
        _finite_positive("rope_local_base", cfg.rope_local_base)


def describe_layers(cfg: ModelConfig) -> list[str]:
    """One readable line per layer: its attention kind, RoPE and soft-cap (``interp info``)."""
    out = []
    for i in range(cfg.n_layers):
        sliding = cfg.is_sliding_layer(i)
        parts = [f"sliding({cfg.sliding_window})" if sliding else f"global({cfg.mask})"]
        if cfg.positional == "rope":
            if sliding and cfg.rope_local_base is not None:
                parts.append(f"rope base {cfg.rope_local_base:g}")
            else:
                parts.append(f"rope base {cfg.rope_base:g}")
                if cfg.rope_scaling is not None:
                    parts.append(str(cfg.rope_scaling))
        if cfg.attn_softcap is not None:
            parts.append(f"softcap {cfg.attn_softcap:g}")
        out.append(" ".join(parts))
    return out
