"""Validation of a :class:`interp.config.ModelConfig`, one small function per concern.

``ModelConfig.__post_init__`` calls these in order, after the derived fields are filled in:
sizes, choices, booleans and numbers, architecture, positions, norms, attention kernel, MoE,
unembedding. Each raises ``ValueError`` with one sentence that says what to change; none of
them changes the config (derivation and normalisation live in :mod:`interp.config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from interp.config import ModelConfig

#: the sizes every config must give (TransformerLens' names); everything else has a default
REQUIRED_SIZES = ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx")

FLAGS = (
    "attn_only", "parallel_attn_mlp", "tie_embeddings", "has_unembed", "mlm_head",
    "rope_interleaved", "embed_norm", "final_norm", "norm_bias", "attn_qkv_bias",
    "attn_out_bias", "mlp_bias", "unembed_bias", "router_renormalize", "shared_expert_gate",
)
POSITIVE_NUMBERS = ("rope_base", "norm_eps", "attn_temperature", "logit_scale", "init_std")
LOSS_COEFS = ("moe_aux_loss_coef", "router_z_loss_coef")


def positive_int(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float)


def _is_count(v: Any) -> bool:
    """An int >= 0 (a bool is not a count)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_required_sizes(cfg: ModelConfig) -> None:
    """The five sizes every derivation starts from; checked before anything is derived."""
    for name in REQUIRED_SIZES:
        positive_int(name, getattr(cfg, name))


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
    so a typo never hides."""
    for name in POSITIVE_NUMBERS:
        v = getattr(cfg, name)
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    for name in LOSS_COEFS:
        v = getattr(cfg, name)
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}.")
    s = cfg.attn_scale
    if s is not None and (not _is_number(s) or not math.isfinite(s) or s <= 0):
        raise ValueError(
            f"attn_scale must be a positive number (or None for 1/sqrt(d_head)), got {s!r}."
        )
    p = cfg.soft_mask_penalty
    if p is not None and (not _is_number(p) or math.isnan(p) or p < 0):
        raise ValueError(
            f"soft_mask_penalty must be >= 0 (a finite penalty on masked keys), got {p!r}; "
            "use None for a hard mask."
        )
    if not _is_count(cfg.n_token_types):
        raise ValueError(f"n_token_types must be an integer >= 0, got {cfg.n_token_types!r}.")
    for name in ("relative_buckets", "relative_max_distance", "experts_per_token"):
        positive_int(name, getattr(cfg, name))


def check_architecture(cfg: ModelConfig) -> None:
    """Decoder layers exist only in an encoder-decoder, whose decoder is causal."""
    if cfg.architecture == "encoder_decoder":
        positive_int("n_decoder_layers", cfg.n_decoder_layers)
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
    if cfg.positional == "relative" and cfg.relative_buckets < 4:
        raise ValueError(
            "relative_buckets must be at least 4 (half exact, half logarithmic, per direction)."
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
