"""GPT-J (Wang and Komatsuzaki 2021): parallel attention and MLP from one LayerNorm,
interleaved partial rotary.

``x + attn(ln_1 x) + mlp(ln_1 x)``: the core's parallel block normalises twice (``ln1`` for
attention, ``ln2`` for the MLP), so ``ln_1`` is loaded into both (same values, hooks on each).
RoPE rotates the first ``rotary_dim`` dims of each head in pairs (0, 1), (2, 3), ...
(``rope_interleaved=True``); q, k, v and the output projection have no bias, the MLP and the
unembedding do.
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
from interp.loading.families.variants import rope_params

IGNORED = (".attn.bias", ".attn.masked_bias", "embed_positions")


def config_from_hf(hf: Any) -> ModelConfig:
    """GPT-J config.json -> ModelConfig."""
    d, nh = int(hf_require(hf, "n_embd")), int(hf_require(hf, "n_head"))
    base, scaling = rope_params(hf)
    return make_config(
        n_layers=int(hf_require(hf, "n_layer")), d_model=d, n_heads=nh,
        d_mlp=int(hf_get(hf, "n_inner") or 4 * d), d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "n_positions") or 2048), positional="rope",
        rotary_dim=int(hf_get(hf, "rotary_dim") or d // nh), rope_base=base, rope_scaling=scaling,
        rope_interleaved=True, norm="layernorm",
        norm_eps=float(hf_get(hf, "layer_norm_epsilon", 1e-5)),
        act=act_name(hf_get(hf, "activation_function", "gelu_new")), parallel_attn_mlp=True,
        attn_qkv_bias=False, attn_out_bias=False, mlp_bias=True, unembed_bias=True,
        has_unembed=has_lm_head(hf),
        tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", False)),
        extra={"hf_model_type": "gptj"},
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-J HF tensors -> core tensors."""
    prefix = detect_prefix(state_dict.keys(), ("transformer.", ""), "wte.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    d, m = cfg.d_model, cfg.d_mlp
    out = {"embed.W_E": t.take("wte.weight", (cfg.d_vocab, d))}
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        w, b = t.take(p + "ln_1.weight", (d,)), t.take(p + "ln_1.bias", (d,))
        out[q + "ln1.w"], out[q + "ln1.b"] = w, b
        out[q + "ln2.w"], out[q + "ln2.b"] = w.clone(), b.clone()
        a = p + "attn."
        out[q + "attn.qkv.weight"] = fuse_qkv(t.take(a + "q_proj.weight", (d, d)),
                                              t.take(a + "k_proj.weight", (d, d)),
                                              t.take(a + "v_proj.weight", (d, d)))
        out[q + "attn.o.weight"] = t.take(a + "out_proj.weight", (d, d))
        out[q + "mlp.fc_in.weight"] = t.take(p + "mlp.fc_in.weight", (m, d))
        out[q + "mlp.fc_in.bias"] = t.take(p + "mlp.fc_in.bias", (m,))
        out[q + "mlp.fc_out.weight"] = t.take(p + "mlp.fc_out.weight", (d, m))
        out[q + "mlp.fc_out.bias"] = t.take(p + "mlp.fc_out.bias", (d,))
    out["ln_final.w"] = t.take("ln_f.weight", (d,))
    out["ln_final.b"] = t.take("ln_f.bias", (d,))
    if cfg.has_unembed:
        if cfg.tie_embeddings:
            t.skip("lm_head.weight", absolute=True)
        else:
            out["unembed.weight"] = t.take("lm_head.weight", (cfg.d_vocab_out, d), absolute=True)
        out["unembed.b_U"] = t.take("lm_head.bias", (cfg.d_vocab_out,), absolute=True)
    t.finish()
    return out
