"""Validation of a :class:`interp.config.ModelConfig`, one small function per concern.

``ModelConfig.__post_init__`` calls these in order, after the derived fields are filled in:
sizes, choices, booleans and numbers, mask parameters, architecture, positions, norms,
attention kernel, MoE, unembedding. Each raises ``ValueError`` with one sentence that says what
to change; none of them changes the config (derivation and normalisation live in
:mod:`interp.config`).

Together they make "constructs => runs" true (issue 24; tests/test_config_runs.py): a value
that would fail only at forward time (T5 buckets whose maximum distance lies inside their exact
range, a mask parameter past int64, a scalar that overflows float32, a mask tree too deep to
evaluate) is refused here. Whether this machine can hold the model is not a property of the
config: :mod:`interp.config_memory` checks it when the model is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from interp.masks import MaskSpec

if TYPE_CHECKING:
    from interp.config import ModelConfig

#: the sizes every config must give (TransformerLens' names); everything else has a default
REQUIRED_SIZES = ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx")

FLAGS = (
    "attn_only", "parallel_attn_mlp", "tie_embeddings", "has_unembed", "mlm_head",
    "rope_interleaved", "embed_norm", "final_norm", "norm_bias", "attn_qkv_bias",
    "attn_out_bias", "mlp_bias", "unembed_bias", "router_renormalize", "shared_expert_gate",
    "default_prepend_bos",
    "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens",
)
#: positive scalars: field -> (smallest, largest or None, why the bounds). A bound is where
#: float32 arithmetic under- or overflows at forward time, or where larger values change nothing
POSITIVE_NUMBERS: dict[str, tuple[float, float | None, str]] = {
    "rope_base": (0.0, None, ""),
    "norm_eps": (0.0, None, ""),
    "init_std": (0.0, 1.0, "weights are drawn from N(0, init_std**2); GPT-2 uses 0.02, and a "
                 "larger std overflows float activations within a few layers"),
    "logit_scale": (0.0, 1e4, "it multiplies the final residual; T5 uses d_model**-0.5"),
    "attn_temperature": (1e-4, 1e4, "the scores are divided by it; outside 1e-4..1e4 the "
                         "softmax is one-hot or flat, and the scaled scores under- or overflow"),
}
#: loss weights: >= 0, at most this (Switch uses 0.01, ST-MoE's z-loss 0.001)
LOSS_COEFS = ("moe_aux_loss_coef", "router_z_loss_coef")
MAX_LOSS_COEF = 1e4
#: attn_scale's range (default 1/sqrt(d_head), T5 1.0); outside it the scores under- or overflow
ATTN_SCALE_RANGE = (1e-4, 1e4)
#: exp(-1e4) is 0 in every float type, so a larger soft penalty is the hard mask
MAX_SOFT_MASK_PENALTY = 1e4
#: mask parameters (window, block, stride, prefix) are compared with int64 positions
MAX_MASK_PARAMETER = 2**63 - 1
#: a mask tree is evaluated recursively in every forward; Python stops at ~1,000 frames
MAX_MASK_DEPTH = 100
#: layers of a stack and experts of a layer are each a Python module (kilobytes of objects and
#: a Python step in every forward, whatever their width); the largest models have ~100 layers
#: and ~256 experts
MAX_MODULES = 10_000


def positive_int(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def _is_finite(v: Any) -> bool:
    """A real number that is a finite float (an int past float's range is not)."""
    try:
        return _is_number(v) and math.isfinite(v)
    except OverflowError:  # an int beyond 1.8e308
        return False


def _in_range(name: str, v: Any, lo: float, hi: float | None, why: str, what: str) -> None:
    """``v`` is a finite number with ``lo < v <= hi`` (``lo <= v`` when ``lo`` is not 0)."""
    if not _is_finite(v) or (v <= lo if lo == 0 else v < lo):
        reason = f" ({why})" if lo and why else ""
        raise ValueError(f"{name} must be {what}{reason}, got {v!r}.")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be at most {hi:g} ({why}), got {v!r}.")


def _is_count(v: Any) -> bool:
    """An int >= 0 (a bool is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def module_count(name: str, value: Any) -> None:
    """A positive int of at most :data:`MAX_MODULES` (a count of layers or experts)."""
    positive_int(name, value)
    if value > MAX_MODULES:
        raise ValueError(
            f"{name}={value} is more than {MAX_MODULES:,}: each is a Python module of its own "
            "(the largest models have ~100 layers, ~256 experts); use fewer."
        )


def check_required_sizes(cfg: ModelConfig) -> None:
    """The five sizes every derivation starts from; checked before anything is derived."""
    for name in REQUIRED_SIZES:
        positive_int(name, getattr(cfg, name))
    module_count("n_layers", cfg.n_layers)


def check_widths(cfg: ModelConfig) -> None:
    """Per-head, FFN, key/value-head and unembedding widths (given or derived)."""
    for name in ("d_head", "d_mlp", "n_kv_heads"):
        positive_int(name, getattr(cfg, name))
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads} "
            "(each key/value head serves a whole group of query heads)."
        )
    positive_int("d_vocab_out", cfg.d_vocab_out)


def check_choices(cfg: ModelConfig, choices: Mapping[str, tuple[str, ...]]) -> None:
    """Every ``Literal`` field holds one of its values (``choices``: field -> valid values)."""
    for name, valid in choices.items():
        value = getattr(cfg, name)
        if value not in valid:
            raise ValueError(f"Unknown {name} {value!r}; valid values: {', '.join(valid)}.")


def check_flags(cfg: ModelConfig) -> None:
    """Boolean fields are real bools (``"yes"`` or ``1`` is a typo, not a choice)."""
    for name in FLAGS:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}.")


def check_numbers(cfg: ModelConfig) -> None:
    """Scalars and counts; fields that matter only for some variants are still type-checked,
    so a typo never hides. Each scalar is bounded where float32 would overflow at run time."""
    for name, (lo, hi, why) in POSITIVE_NUMBERS.items():
        what = "a positive finite number" if lo == 0 else f"a finite number >= {lo:g}"
        _in_range(name, getattr(cfg, name), lo, hi, why, what)
    for name in LOSS_COEFS:
        v = getattr(cfg, name)
        if not _is_finite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")
        if v > MAX_LOSS_COEF:
            raise ValueError(f"{name} must be at most {MAX_LOSS_COEF:g} (a loss weight; Switch "
                             f"uses 0.01), got {v!r}.")
    if cfg.attn_scale is not None:
        lo, hi = ATTN_SCALE_RANGE
        _in_range("attn_scale", cfg.attn_scale, lo, hi,
                  "it multiplies the scores; None is 1/sqrt(d_head), T5 uses 1.0",
                  f"a number in {lo:g}..{hi:g} or None")
    _check_penalty(cfg.soft_mask_penalty)
    if not _is_count(cfg.n_token_types):
        raise ValueError(f"n_token_types must be an integer >= 0, got {cfg.n_token_types!r}.")
    for name in ("relative_buckets", "relative_max_distance", "experts_per_token"):
        positive_int(name, getattr(cfg, name))


def _check_penalty(p: Any) -> None:
    """A soft-mask penalty is None (a hard mask) or a finite number in 0..1e4."""
    if p is None:
        return
    if not _is_number(p) or p != p or p < 0:  # p != p: NaN (an int too large for isnan)
        raise ValueError(
            f"soft_mask_penalty must be >= 0 (a finite penalty on masked keys), got {p!r}; "
            "use None for a hard mask."
        )
    if not _is_finite(p) or p > MAX_SOFT_MASK_PENALTY:
        raise ValueError(
            f"soft_mask_penalty must be at most {MAX_SOFT_MASK_PENALTY:g}, got {p!r}: exp(-1e4) "
            "is already 0 in every float type, so a larger penalty is the hard mask; use None."
        )


def check_architecture(cfg: ModelConfig) -> None:
    """Decoder layers exist only in an encoder-decoder, whose decoder is causal."""
    if cfg.architecture == "encoder_decoder":
        module_count("n_decoder_layers", cfg.n_decoder_layers)
        if not cfg.mask.is_causal:
            raise ValueError(
                "An encoder-decoder's decoder must use the causal mask (its encoder is always "
                "bidirectional); remove the mask setting."
            )
    elif cfg.n_decoder_layers is not None:
        raise ValueError(
            "n_decoder_layers applies only to architecture='encoder_decoder'; remove it."
        )


def check_positions(cfg: ModelConfig) -> None:
    """RoPE's rotated width and T5's relative buckets."""
    if cfg.positional == "rope":
        positive_int("rotary_dim", cfg.rotary_dim)
        if cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.d_head:
            raise ValueError(
                f"rotary_dim={cfg.rotary_dim} must be even and at most d_head={cfg.d_head}."
            )
    elif cfg.rotary_dim is not None:
        raise ValueError(
            f"rotary_dim applies only to positional='rope' (got positional={cfg.positional!r}); "
            "remove it."
        )
    if cfg.positional == "relative":
        _check_relative_buckets(cfg)


def _check_relative_buckets(cfg: ModelConfig) -> None:
    """T5's buckets: half of each direction's buckets are exact offsets, the rest logarithmic
    from there up to ``relative_max_distance``, which must lie beyond the exact range (else the
    logarithmic bucket ids come out negative or infinite: Raffel et al. 2020, sec. 2.1)."""
    if cfg.relative_buckets < 4:
        raise ValueError(
            "relative_buckets must be at least 4 (half exact, half logarithmic, per direction)."
        )
    # a causal stack (any encoder-decoder's decoder) gives all buckets to the past; a
    # bidirectional one splits them between past and future (positions.RelativePositionBias)
    causal = cfg.architecture == "encoder_decoder" or cfg.mask.is_causal
    exact = cfg.relative_buckets // 2 if causal else cfg.relative_buckets // 4
    if cfg.relative_max_distance <= exact:
        stack = "a causal stack" if causal else "a bidirectional stack, half per direction"
        raise ValueError(
            f"relative_max_distance={cfg.relative_max_distance} must exceed the {exact} exact "
            f"offsets of relative_buckets={cfg.relative_buckets} ({stack}); set "
            f"relative_max_distance > {exact} (T5: 32 buckets, 128) or use fewer buckets."
        )
    if cfg.relative_max_distance > MAX_MASK_PARAMETER:
        raise ValueError(
            f"relative_max_distance must be at most 2**63 - 1 (positions are int64), got "
            f"{cfg.relative_max_distance!r}."
        )


def check_mask_parameters(cfg: ModelConfig) -> None:
    """Every parameter of every mask in the tree (window, block, stride, prefix) is an int, not
    a bool, that int64 positions can be compared with; the tree is shallow enough for the
    recursive ``allowed`` of the forward pass."""
    stack = [(cfg.mask, 1)]
    while stack:
        mask, depth = stack.pop()
        if depth > MAX_MASK_DEPTH:
            raise ValueError(
                f"mask is nested more than {MAX_MASK_DEPTH} deep (masks combine a handful of "
                "predicates, and the forward pass evaluates the tree recursively); simplify it."
            )
        if not dataclasses.is_dataclass(mask):
            continue  # a user's own MaskSpec: its parameters are its business
        for f in dataclasses.fields(mask):
            v = getattr(mask, f.name)
            if isinstance(v, MaskSpec):
                stack.append((v, depth + 1))
            elif isinstance(v, bool) or not isinstance(v, int) or v > MAX_MASK_PARAMETER:
                leaf = str(mask).partition("(")[0]
                raise ValueError(
                    f"mask {mask}: its {f.name} must be an integer of at most 2**63 - 1 "
                    f"(positions are int64), got {v!r}; pass e.g. '{leaf}:4'."
                )


def check_norms(cfg: ModelConfig) -> None:
    """Norm type and placement against the embedding norm, q/k norms and parallel blocks."""
    if cfg.embed_norm and cfg.architecture == "encoder_decoder":
        raise ValueError(
            "embed_norm is implemented for decoder-only and encoder-only stacks (the "
            "encoder-decoder's decoder has no embedding norm); remove it."
        )
    if cfg.norm == "none" and (cfg.embed_norm or cfg.qk_norm != "none"):
        raise ValueError(
            "norm='none' cannot be combined with embed_norm or qk_norm; pick a norm type."
        )
    if cfg.parallel_attn_mlp and cfg.norm_placement == "post":
        raise ValueError(
            "parallel_attn_mlp needs pre-norm: with post-norm there is no single residual sum "
            "to normalise; set norm_placement='pre'."
        )
    if cfg.parallel_attn_mlp and cfg.attn_only:
        raise ValueError(
            "parallel_attn_mlp needs an MLP; it cannot be combined with attn_only=True."
        )


def check_attention_kernel(cfg: ModelConfig) -> None:
    """Linear attention never forms scores: no score biases, odd masks or softmax settings."""
    if cfg.attn_kernel != "linear":
        return
    if cfg.positional in ("alibi", "relative"):
        raise ValueError(
            f"Linear attention cannot add a {cfg.positional} score bias (it never forms "
            "scores); use positional 'rope', 'learned', 'sinusoidal' or 'none'."
        )
    if not (cfg.mask.is_causal or cfg.mask.is_full):
        raise ValueError(
            f"Linear attention supports only causal or bidirectional masks, got {cfg.mask}; "
            "use attn_kernel='auto' for other masks."
        )
    if cfg.soft_mask_penalty is not None or cfg.attn_temperature != 1.0:
        raise ValueError(
            "Linear attention has no softmax, so soft_mask_penalty and attn_temperature do "
            "not apply; remove them or use attn_kernel='auto'."
        )


def check_moe(cfg: ModelConfig) -> None:
    """Expert counts, and the MoE-only fields given without experts."""
    if not _is_count(cfg.n_experts):
        raise ValueError(
            f"n_experts must be an integer >= 0 (0 = dense), got {cfg.n_experts!r}."
        )
    if not _is_count(cfg.n_shared_experts):
        raise ValueError(
            f"n_shared_experts must be an integer >= 0, got {cfg.n_shared_experts!r}."
        )
    if cfg.n_experts:
        module_count("n_experts", cfg.n_experts)
        _check_experts(cfg)
        return
    if cfg.n_shared_experts:
        raise ValueError(
            "n_shared_experts needs n_experts > 0; set n_experts or remove n_shared_experts."
        )
    if cfg.moe_layers is not None:
        raise ValueError("moe_layers needs n_experts > 0; set n_experts or remove moe_layers.")
    if cfg.d_expert is not None or cfg.d_shared_expert is not None:
        raise ValueError(
            "d_expert / d_shared_expert need n_experts > 0; remove them or set n_experts."
        )


def _check_experts(cfg: ModelConfig) -> None:
    """A model with experts: routing width, expert widths, which layers, which stack."""
    if cfg.attn_only:
        raise ValueError(
            "An attention-only model has no FFN to turn into experts; set n_experts=0 or "
            "attn_only=False."
        )
    if cfg.experts_per_token > cfg.n_experts:
        raise ValueError(
            f"experts_per_token={cfg.experts_per_token} exceeds n_experts={cfg.n_experts}; "
            "route to at most n_experts."
        )
    positive_int("d_expert", cfg.d_expert)
    positive_int("d_shared_expert", cfg.d_shared_expert)
    _check_moe_layers(cfg)
    if cfg.architecture == "encoder_decoder":
        raise ValueError(
            "MoE is implemented for decoder-only and encoder-only stacks; set n_experts=0 for "
            "encoder_decoder."
        )
    if cfg.shared_expert_gate and not cfg.n_shared_experts:
        raise ValueError(
            "shared_expert_gate gates the shared experts; set n_shared_experts > 0 or remove it."
        )


def _check_moe_layers(cfg: ModelConfig) -> None:
    """``moe_layers`` is a non-empty collection of layer indices inside the stack."""
    layers = cfg.moe_layers
    if (isinstance(layers, str | bytes | Mapping) or not hasattr(layers, "__iter__")
            or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)):
        raise ValueError(
            f"moe_layers must be a list of integer layer indices, got {layers!r}."
        )
    n_stack = cfg.n_decoder_layers if cfg.architecture == "encoder_decoder" else cfg.n_layers
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_stack:
        raise ValueError(f"moe_layers {layers} must be non-empty indices in 0..{n_stack - 1}.")


def check_unembedding(cfg: ModelConfig) -> None:
    """Tied embeddings and the BERT MLM head need an unembedding of the right width."""
    if cfg.tie_embeddings and cfg.d_vocab_out != cfg.d_vocab:
        raise ValueError(
            "tie_embeddings needs d_vocab_out == d_vocab; untie or make them equal."
        )
    if cfg.mlm_head and not cfg.has_unembed:
        raise ValueError("mlm_head needs has_unembed=True.")
    if not cfg.has_unembed and cfg.tie_embeddings:
        raise ValueError("tie_embeddings needs has_unembed=True.")


#: what each memory kind cannot run with: (condition, the setting to name, what to change)
def _memory_conflicts(cfg: ModelConfig) -> list[tuple[bool, str]]:
    kind = cfg.memory_kind
    return [
        (cfg.architecture == "encoder_decoder",
         "architecture='encoder_decoder' (memory is built for decoder-only and encoder-only "
         "stacks; set architecture='decoder' or memory_kind=None)"),

        (cfg.attn_kernel == "linear",
         "attn_kernel='linear' (memory attention is a softmax over memory and context; use "
         "attn_kernel='auto')"),
        (cfg.soft_mask_penalty is not None or cfg.attn_softcap is not None,
         "a soft mask penalty or attention softcap (remove soft_mask_penalty / attn_softcap)"),
        (cfg.adaptive_span or cfg.selective_attention,
         "adaptive_span / selective_attention (learned masks edit scores memory does not have; "
         "turn them off)"),
        (kind == "xl" and cfg.layer_types is not None and "sliding" in cfg.layer_types,
         "sliding layers (XL memory extends the window it would cut; remove layer_types)"),
        (kind == "xl" and cfg.qk_norm != "none",
         "qk_norm (XL memory recomputes keys without it; set qk_norm='none')"),
        (kind == "xl" and (cfg.use_attn_in or cfg.use_split_qkv_input),
         "use_attn_in / use_split_qkv_input (XL memory keeps one layer input per position, not "
         "one per head; turn them off)"),
        (kind != "knn" and cfg.memory_qk_norm is not False,
         "memory_qk_norm (the cosine search of a kNN store; set memory_kind='knn' or "
         "memory_qk_norm=False)"),
        (kind != "knn" and cfg.memory_joint is not False,
         "memory_joint (one softmax over retrieved kNN entries and the context; set "
         "memory_kind='knn' or memory_joint=False)"),
    ]


def check_memory(cfg: ModelConfig) -> None:
    """Memory-augmented attention (interp.components.memory): its sizes, its layers, and the
    kernels, masks and positions it cannot run with."""
    kind = cfg.memory_kind
    if kind is None:
        return
    if kind not in ("persistent", "knn", "xl"):
        raise ValueError(f"memory_kind={kind!r} is unknown; valid: 'persistent', 'knn', 'xl' "
                         "or None.")
    for bad, what in _memory_conflicts(cfg):
        if bad:
            raise ValueError(f"memory_kind={kind!r} cannot run with {what}.")
    for name in ("n_memory_slots", "memory_topk", "memory_size", "mem_len", "cmem_rate"):
        positive_int(name, getattr(cfg, name))
    for name in ("memory_qk_norm", "memory_joint"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}.")
    if isinstance(cfg.cmem_len, bool) or not isinstance(cfg.cmem_len, int) or cfg.cmem_len < 0:
        raise ValueError(f"cmem_len must be an integer >= 0, got {cfg.cmem_len!r}.")
    if cfg.memory_topk > cfg.memory_size:
        raise ValueError(f"memory_topk={cfg.memory_topk} exceeds memory_size="
                         f"{cfg.memory_size}; retrieve at most as many entries as are kept.")
    layers = cfg.memory_layers
    if layers is not None and (not layers or not all(
            isinstance(i, int) and 0 <= i < cfg.n_layers for i in layers)):
        raise ValueError(f"memory_layers={layers!r} must list layers in 0..{cfg.n_layers - 1}; "
                         "or leave it None for every layer.")
