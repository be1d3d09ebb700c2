"""GPT-NeoX / Pythia (Black et al. 2022; Biderman et al. 2023): partial rotary, parallel residual.

``query_key_value`` interleaves heads: its rows are, per head, [q_h; k_h; v_h] (transformers
views it as [..., head, 3 * d_head] and chunks the last axis); the converter regroups them
into the core's [q; k; v]. RoPE rotates the first ``rotary_pct * d_head`` dims in halves
(``rope_interleaved=False``); ``use_parallel_residual`` maps to ``parallel_attn_mlp``.
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
    has_lm_head,
    hf_get,
    hf_require,
    make_config,
    rope_partial_factor,
    rope_theta,
)

IGNORED = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(hf: Any) -> ModelConfig:
    d, nh = int(hf_require(hf, "hidden_size")), int(hf_require(hf, "num_attention_heads"))
    dh = d // nh
    bias = bool(hf_get(hf, "attention_bias", True))
    return make_config(
        n_layers=int(hf_require(hf, "num_hidden_layers")), d_model=d, n_heads=nh,
        d_mlp=int(hf_require(hf, "intermediate_size")), d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "max_position_embeddings") or 2048), positional="rope",
        rotary_dim=int(dh * rope_partial_factor(hf)), rope_base=rope_theta(hf),
        rope_interleaved=False, norm="layernorm",
        norm_eps=float(hf_get(hf, "layer_norm_eps", 1e-5)),
        act=act_name(hf_get(hf, "hidden_act", "gelu")),
        parallel_attn_mlp=bool(hf_get(hf, "use_parallel_residual", True)), attn_qkv_bias=bias,
        attn_out_bias=bias, has_unembed=has_lm_head(hf),
        tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", False)),
        extra={"hf_model_type": "gpt_neox"},
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = detect_prefix(state_dict.keys(), ("gpt_neox.", ""), "embed_in.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    d, m, nh, dh = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head
    out = {"embed.W_E": t.take("embed_in.weight", (cfg.d_vocab, d))}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        out[q + "ln1.w"] = t.take(p + "input_layernorm.weight", (d,))
        out[q + "ln1.b"] = t.take(p + "input_layernorm.bias", (d,))
        out[q + "ln2.w"] = t.take(p + "post_attention_layernorm.weight", (d,))
        out[q + "ln2.b"] = t.take(p + "post_attention_layernorm.bias", (d,))
        w = t.take(p + "attention.query_key_value.weight", (3 * nh * dh, d))
        # stored per head; the core wants [q; k; v]
        out[q + "attn.qkv.weight"] = w.view(nh, 3, dh, d).transpose(0, 1).reshape(3 * nh * dh, d)
        out[q + "attn.o.weight"] = t.take(p + "attention.dense.weight", (d, nh * dh))
        if cfg.attn_qkv_bias:
            b = t.take(p + "attention.query_key_value.bias", (3 * nh * dh,))
            out[q + "attn.qkv.bias"] = b.view(nh, 3, dh).transpose(0, 1).reshape(-1)
        if cfg.attn_out_bias:
            out[q + "attn.o.bias"] = t.take(p + "attention.dense.bias", (d,))
        out[q + "mlp.fc_in.weight"] = t.take(p + "mlp.dense_h_to_4h.weight", (m, d))
        out[q + "mlp.fc_in.bias"] = t.take(p + "mlp.dense_h_to_4h.bias", (m,))
        out[q + "mlp.fc_out.weight"] = t.take(p + "mlp.dense_4h_to_h.weight", (d, m))
        out[q + "mlp.fc_out.bias"] = t.take(p + "mlp.dense_4h_to_h.bias", (d,))
    out["ln_final.w"] = t.take("final_layer_norm.weight", (d,))
    out["ln_final.b"] = t.take("final_layer_norm.bias", (d,))
    if cfg.tie_embeddings:
        t.skip("embed_out.weight", absolute=True)
        t.skip("lm_head.weight", absolute=True)
    elif cfg.has_unembed:
        name = "embed_out.weight" if t.has("embed_out.weight", absolute=True) else "lm_head.weight"
        out["unembed.weight"] = t.take(name, (cfg.d_vocab, d), absolute=True)
    t.finish()
    return out
