"""GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm, GELU (tanh), tied embeddings.

Its linear layers are ``Conv1D`` modules storing weights as [in, out]; the converter transposes
them to ``nn.Linear``'s [out, in]. ``c_attn`` already holds [q | k | v] along its output axis.
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
    has_lm_head,
    hf_get,
    hf_require,
    make_config,
)

IGNORED = (".attn.bias", ".attn.masked_bias")  # old checkpoints carry the causal mask as a buffer


def config_from_hf(hf: Any) -> ModelConfig:
    if hf_get(hf, "scale_attn_by_inverse_layer_idx", False):
        raise InterpError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx=true are not "
                          "supported.")
    d = int(hf_require(hf, "n_embd"))
    return make_config(
        n_layers=int(hf_require(hf, "n_layer")), d_model=d, n_heads=int(hf_require(hf, "n_head")),
        d_mlp=int(hf_get(hf, "n_inner") or 4 * d), d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_require(hf, "n_positions")), positional="learned", norm="layernorm",
        norm_eps=float(hf_get(hf, "layer_norm_epsilon", 1e-5)),
        act=act_name(hf_get(hf, "activation_function", "gelu_new")),
        has_unembed=has_lm_head(hf),
        tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", True)),
        attn_scale=None if hf_get(hf, "scale_attn_weights", True) else 1.0,
        extra={"hf_model_type": "gpt2"},
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = detect_prefix(state_dict.keys(), ("transformer.", ""), "wte.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    d, m = cfg.d_model, cfg.d_mlp
    out = {"embed.W_E": t.take("wte.weight", (cfg.d_vocab, d)),
           "pos_embed.W_pos": t.take("wpe.weight", (cfg.n_ctx, d))}
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        out[q + "ln1.w"] = t.take(p + "ln_1.weight", (d,))
        out[q + "ln1.b"] = t.take(p + "ln_1.bias", (d,))
        out[q + "ln2.w"] = t.take(p + "ln_2.weight", (d,))
        out[q + "ln2.b"] = t.take(p + "ln_2.bias", (d,))
        # Conv1D stores [in, out]
        out[q + "attn.qkv.weight"] = t.take(p + "attn.c_attn.weight", (d, 3 * d)).T.contiguous()
        out[q + "attn.qkv.bias"] = t.take(p + "attn.c_attn.bias", (3 * d,))
        out[q + "attn.o.weight"] = t.take(p + "attn.c_proj.weight", (d, d)).T.contiguous()
        out[q + "attn.o.bias"] = t.take(p + "attn.c_proj.bias", (d,))
        out[q + "mlp.fc_in.weight"] = t.take(p + "mlp.c_fc.weight", (d, m)).T.contiguous()
        out[q + "mlp.fc_in.bias"] = t.take(p + "mlp.c_fc.bias", (m,))
        out[q + "mlp.fc_out.weight"] = t.take(p + "mlp.c_proj.weight", (m, d)).T.contiguous()
        out[q + "mlp.fc_out.bias"] = t.take(p + "mlp.c_proj.bias", (d,))
    out["ln_final.w"], out["ln_final.b"] = t.take("ln_f.weight", (d,)), t.take("ln_f.bias", (d,))
    if cfg.tie_embeddings:
        t.skip("lm_head.weight", absolute=True)
    elif cfg.has_unembed:
        out["unembed.weight"] = t.take("lm_head.weight", (cfg.d_vocab, d), absolute=True)
    t.finish()
    return out
