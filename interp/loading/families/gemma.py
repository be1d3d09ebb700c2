"""Gemma, Gemma 2 and Gemma 3 (text): RMSNorm decoders with scaled embeddings and GeGLU-tanh.

- Gemma: pre-norm, embeddings times ``sqrt(d_model)``, RMSNorm weights stored as ``w - 1``
  (the reference computes ``x_hat * (1 + w)``; we add the 1 once, at load).
- Gemma 2: sandwich norms (``input`` / ``post_attention`` / ``pre_feedforward`` /
  ``post_feedforward``: ``ln1``, ``ln1_post``, ``ln2``, ``ln2_post``), alternating sliding and
  global layers, attention and final-logit soft-capping, scores scaled by
  ``query_pre_attn_scalar ** -0.5``.
- Gemma 3: Gemma 2 without soft-caps, 5 sliding : 1 global, q/k RMSNorm per head, RoPE base
  10,000 on sliding layers and 1e6 (optionally scaled) on global ones. ``gemma3_text`` is the
  text-only checkpoint; a multimodal ``gemma3`` one loads its language model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError
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
from interp.loading.families.llama import IGNORED, take_gated_mlp
from interp.loading.families.variants import layer_types, rope_params

#: the image side of a multimodal Gemma 3 checkpoint (``model_type`` gemma3): not loaded
#: (in memory, transformers 5: ``model.vision_tower.``; on disk: ``vision_tower.``)
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                   "multi_modal_projector.")


def config_from_hf(hf: Any) -> ModelConfig:
    """Gemma / Gemma 2 / Gemma 3 text config.json -> ModelConfig. A multimodal Gemma 3
    (``model_type`` gemma3) loads its language model from ``text_config``; its vision tower
    is left out (interp runs token ids, not images)."""
    mt = hf_get(hf, "model_type")
    if mt == "gemma3":
        text = hf_require(hf, "text_config")
        cfg = config_from_hf(text)
        head = has_lm_head(hf)
        return cfg.replace(has_unembed=head, tie_embeddings=head and bool(
            hf_get(hf, "tie_word_embeddings", True)), extra={"hf_model_type": "gemma3"})
    n_heads = int(hf_require(hf, "num_attention_heads"))
    d_model = int(hf_require(hf, "hidden_size"))
    n_layers = int(hf_require(hf, "num_hidden_layers"))
    d_head = int(hf_get(hf, "head_dim") or d_model // n_heads)
    act = hf_get(hf, "hidden_activation") or hf_get(hf, "hidden_act") or "gelu_pytorch_tanh"
    fields: dict[str, Any] = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
        n_kv_heads=int(hf_get(hf, "num_key_value_heads") or n_heads),
        d_mlp=int(hf_require(hf, "intermediate_size")),
        d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "max_position_embeddings") or 8192),
        positional="rope", norm="rmsnorm", norm_bias=False,
        norm_eps=float(hf_get(hf, "rms_norm_eps", 1e-6)),
        act=act_name(act, gated=True), mlp_bias=False,
        attn_qkv_bias=bool(hf_get(hf, "attention_bias", False)),
        attn_out_bias=bool(hf_get(hf, "attention_bias", False)),
        embed_scale=d_model**0.5,
        has_unembed=has_lm_head(hf),
        tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", True)),
        extra={"hf_model_type": mt},
    )
    if mt == "gemma":
        fields["rope_base"], fields["rope_scaling"] = rope_params(hf)
        return make_config(**fields)
    lt = layer_types(hf, n_layers)
    fields.update(
        norm_placement="sandwich",
        attn_scale=float(hf_get(hf, "query_pre_attn_scalar") or d_head) ** -0.5,
        attn_softcap=hf_get(hf, "attn_logit_softcapping"),
        final_softcap=hf_get(hf, "final_logit_softcapping"),
        layer_types=lt,
        sliding_window=int(hf_require(hf, "sliding_window")) if lt else None,
    )
    if mt == "gemma2":
        fields["rope_base"], fields["rope_scaling"] = rope_params(hf)
        return make_config(**fields)
    fields["qk_norm"] = "head"
    fields["rope_base"], fields["rope_scaling"] = rope_params(hf, "full_attention", 1e6)
    if lt:
        local, local_scaling = rope_params(hf, "sliding_attention", 1e4)
        fields["rope_local_base"] = local
        if local_scaling is not None:
            raise InterpError("config.json field 'rope_parameters': RoPE scaling on sliding "
                              "layers is not supported (Gemma 3 scales only global layers).")
    return make_config(**fields)


def _norm(t: Tensors, name: str, d: int) -> torch.Tensor:
    """A Gemma RMSNorm weight: stored as ``w - 1``, used as ``1 + w``."""
    return t.take(name, (d,)) + 1.0


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Gemma-family HF tensors -> core tensors."""
    prefix = detect_prefix(state_dict.keys(), ("model.language_model.", "language_model.model.",
                                               "model.", ""), "embed_tokens.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    for key in state_dict.keys():
        if key.startswith(VISION_PREFIXES):
            t.skip(key, absolute=True)
    d, nh, nkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        out[q + "attn.qkv.weight"] = fuse_qkv(t.take(a + "q_proj.weight", (nh * dh, d)),
                                              t.take(a + "k_proj.weight", (nkv * dh, d)),
                                              t.take(a + "v_proj.weight", (nkv * dh, d)))
        out[q + "attn.o.weight"] = t.take(a + "o_proj.weight", (d, nh * dh))
        if cfg.attn_qkv_bias:
            out[q + "attn.qkv.bias"] = fuse_qkv(t.take(a + "q_proj.bias", (nh * dh,)),
                                                t.take(a + "k_proj.bias", (nkv * dh,)),
                                                t.take(a + "v_proj.bias", (nkv * dh,)))
            out[q + "attn.o.bias"] = t.take(a + "o_proj.bias", (d,))
        if cfg.qk_norm == "head":
            out[q + "attn.q_norm.w"] = _norm(t, a + "q_norm.weight", dh)
            out[q + "attn.k_norm.w"] = _norm(t, a + "k_norm.weight", dh)
        out[q + "ln1.w"] = _norm(t, p + "input_layernorm.weight", d)
        if cfg.norm_placement == "sandwich":
            out[q + "ln1_post.w"] = _norm(t, p + "post_attention_layernorm.weight", d)
            out[q + "ln2.w"] = _norm(t, p + "pre_feedforward_layernorm.weight", d)
            out[q + "ln2_post.w"] = _norm(t, p + "post_feedforward_layernorm.weight", d)
        else:
            out[q + "ln2.w"] = _norm(t, p + "post_attention_layernorm.weight", d)
        take_gated_mlp(t, p + "mlp.", d, cfg.d_mlp, False, out, q + "mlp.")
    out["embed.W_E"] = t.take("embed_tokens.weight", (cfg.d_vocab, d))
    out["ln_final.w"] = _norm(t, "norm.weight", d)
    if cfg.has_unembed:
        head = next((n for n in ("lm_head.weight", "language_model.lm_head.weight")
                     if t.has(n, absolute=True)), "lm_head.weight")
        if cfg.tie_embeddings:
            t.skip(head, absolute=True)
        else:
            out["unembed.weight"] = t.take(head, (cfg.d_vocab_out, d), absolute=True)
    t.finish()
    return out
