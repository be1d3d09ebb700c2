"""Llama, Mistral, Qwen2 and Qwen3: RMSNorm pre-norm decoders with RoPE, GQA and SwiGLU.

Differences are config fields: Qwen2 has biases on q, k, v (not on o); Mistral (and Qwen2 with
``use_sliding_window``) attends within a sliding window, ``causal & sliding_window(W)`` (a key
is visible when ``q - k < W``, as transformers' ``sliding_window_overlay``); Qwen2/3 with
``max_window_layers`` slide on only some layers (``layer_types``). Qwen3 RMS-normalises q and k
per head. Every ``rope_scaling`` type of :mod:`interp.rope_scaling` is read (Llama 3.x).
The attention layout here is shared with the MoE families (:mod:`.moe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interp.config import ModelConfig
from interp.loading._common import (
    Tensors,
    act_name,
    detect_prefix,
    fuse_qkv,
    has_lm_head,
    hf_get,
    hf_require,
    make_config,
)
from interp.loading.families.variants import layer_types, rope_params

#: derived buffers some checkpoints carry (not weights)
IGNORED = ("rotary_emb.inv_freq",)


def sliding_mask(hf: Any) -> str | None:
    """The mask string for a sliding-window checkpoint, or None for plain causal."""
    mt = hf_get(hf, "model_type")
    window = hf_get(hf, "sliding_window")
    if mt == "qwen2" or mt == "qwen2_moe":
        if not hf_get(hf, "use_sliding_window", False) or window is None:
            return None
        return f"causal&sliding_window:{int(window)}"
    if window is None:
        return None
    return f"causal&sliding_window:{int(window)}"


def decoder_fields(hf: Any) -> dict[str, Any]:
    """The ModelConfig fields every Llama-like decoder shares (attention, norms, positions)."""
    n_heads = int(hf_require(hf, "num_attention_heads"))
    d_model = int(hf_require(hf, "hidden_size"))
    head_dim = hf_get(hf, "head_dim") or d_model // n_heads
    mt = hf_get(hf, "model_type")
    n_layers = int(hf_require(hf, "num_hidden_layers"))
    # per-layer sliding (Qwen2/3 max_window_layers, layer_types); else one mask for every layer
    lt = layer_types(hf, n_layers) if hf_get(hf, "sliding_window") is not None else None
    rope_base, rope_scaling = rope_params(hf)
    if mt == "qwen2":  # biases on q, k, v only
        qkv_bias, out_bias = True, False
    elif mt == "qwen2_moe":
        qkv_bias, out_bias = bool(hf_get(hf, "qkv_bias", True)), False
    else:
        qkv_bias = out_bias = bool(hf_get(hf, "attention_bias", False))
    return dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(hf_get(hf, "num_key_value_heads") or n_heads),
        d_head=int(head_dim),
        d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "max_position_embeddings") or 2048),
        positional="rope",
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        layer_types=lt,
        sliding_window=int(hf_get(hf, "sliding_window")) if lt else None,
        qk_norm="head" if mt in ("qwen3", "qwen3_moe") else "none",
        norm="rmsnorm",
        norm_bias=False,
        norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-6)),
        attn_qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        has_unembed=has_lm_head(hf),
        tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", False)),
        mask=None if lt else sliding_mask(hf),
        extra={"hf_model_type": mt},
    )


def config_from_hf(hf: Any) -> ModelConfig:
    """Llama / Mistral / Qwen2 config.json -> ModelConfig."""
    fields = decoder_fields(hf)
    fields.update(
        d_mlp=int(hf_require(hf, "intermediate_size")),
        act=act_name(hf_get(hf, "hidden_act", "silu"), gated=True),
        mlp_bias=bool(hf_get(hf, "mlp_bias", False)),
    )
    return make_config(**fields)


def take_attention(t: Tensors, p: str, cfg: ModelConfig, out: dict[str, torch.Tensor],
                   q: str) -> None:
    """q/k/v/o projections (and OLMoE's full-width q/k norms) of one layer into ``q`` (our
    prefix)."""
    d, nh, nkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    a = f"{p}self_attn."
    out[f"{q}attn.qkv.weight"] = fuse_qkv(t.take(a + "q_proj.weight", (nh * dh, d)),
                                          t.take(a + "k_proj.weight", (nkv * dh, d)),
                                          t.take(a + "v_proj.weight", (nkv * dh, d)))
    if cfg.attn_qkv_bias:
        out[f"{q}attn.qkv.bias"] = fuse_qkv(t.take(a + "q_proj.bias", (nh * dh,)),
                                            t.take(a + "k_proj.bias", (nkv * dh,)),
                                            t.take(a + "v_proj.bias", (nkv * dh,)))
    out[f"{q}attn.o.weight"] = t.take(a + "o_proj.weight", (d, nh * dh))
    if cfg.attn_out_bias:
        out[f"{q}attn.o.bias"] = t.take(a + "o_proj.bias", (d,))
    if cfg.qk_norm == "full":
        out[f"{q}attn.q_norm.w"] = t.take(a + "q_norm.weight", (nh * dh,))
        out[f"{q}attn.k_norm.w"] = t.take(a + "k_norm.weight", (nkv * dh,))
    elif cfg.qk_norm == "head":
        out[f"{q}attn.q_norm.w"] = t.take(a + "q_norm.weight", (dh,))
        out[f"{q}attn.k_norm.w"] = t.take(a + "k_norm.weight", (dh,))
    out[f"{q}ln1.w"] = t.take(p + "input_layernorm.weight", (d,))
    out[f"{q}ln2.w"] = t.take(p + "post_attention_layernorm.weight", (d,))


def take_gated_mlp(t: Tensors, p: str, d_model: int, d_mlp: int, bias: bool,
                   out: dict[str, torch.Tensor], q: str,
                   names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
    """A SwiGLU FFN (gate, up, down) into the core's fused ``fc_in`` [gate; up] and ``fc_out``."""
    g, u, dn = names
    out[f"{q}fc_in.weight"] = torch.cat([t.take(f"{p}{g}.weight", (d_mlp, d_model)),
                                         t.take(f"{p}{u}.weight", (d_mlp, d_model))])
    out[f"{q}fc_out.weight"] = t.take(f"{p}{dn}.weight", (d_model, d_mlp))
    if bias:
        out[f"{q}fc_in.bias"] = torch.cat([t.take(f"{p}{g}.bias", (d_mlp,)),
                                           t.take(f"{p}{u}.bias", (d_mlp,))])
        out[f"{q}fc_out.bias"] = t.take(f"{p}{dn}.bias", (d_model,))


def take_ends(t: Tensors, cfg: ModelConfig, out: dict[str, torch.Tensor],
              lm_head: str = "lm_head.weight") -> None:
    """Embedding, final norm, unembedding (absent when tied; a tied in-memory copy is skipped)."""
    out["embed.W_E"] = t.take("embed_tokens.weight", (cfg.d_vocab, cfg.d_model))
    out["ln_final.w"] = t.take("norm.weight", (cfg.d_model,))
    if not cfg.has_unembed:
        return
    if cfg.tie_embeddings:
        t.skip(lm_head, absolute=True)  # lm_head lives outside the "model." prefix
    else:
        out["unembed.weight"] = t.take(lm_head, (cfg.d_vocab_out, cfg.d_model), absolute=True)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama-family HF tensors -> core tensors (``*ForCausalLM`` or bare ``*Model``
    checkpoints)."""
    prefix = detect_prefix(state_dict.keys(), ("model.", ""), "embed_tokens.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        take_attention(t, p, cfg, out, f"blocks.{i}.")
        take_gated_mlp(t, p + "mlp.", cfg.d_model, cfg.d_mlp, cfg.mlp_bias, out, f"blocks.{i}.mlp.")
    take_ends(t, cfg, out)
    t.finish()
    return out
