"""BERT (Devlin et al. 2019) and sentence-transformers' MiniLM: a post-norm encoder.

Post-norm residual blocks (``norm_placement="post"``), a LayerNorm on the summed word, position
and token-type embeddings (``embed_norm``), no final norm. ``BertModel`` has no language-model
head (``has_unembed=False``: its output is the last hidden state); ``BertForMaskedLM`` has the
prediction-head transform (``mlm_head``: dense, GELU, LayerNorm) and an unembedding tied to the
word embeddings with its own bias. BertModel's pooler (a dense + tanh on [CLS], used only by the
next-sentence head) is not part of the hooked model: its tensors are dropped deliberately and
listed in ``cfg.extra["dropped"]``.
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

IGNORED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def config_from_hf(hf: Any) -> ModelConfig:
    if (hf_get(hf, "position_embedding_type") or "absolute") != "absolute":
        raise InterpError("BERT position_embedding_type "
                          f"{hf_get(hf, 'position_embedding_type')!r} is not supported; "
                          "only 'absolute'.")
    mlm = has_lm_head(hf, default=False)
    return make_config(
        n_layers=int(hf_require(hf, "num_hidden_layers")),
        d_model=int(hf_require(hf, "hidden_size")),
        n_heads=int(hf_require(hf, "num_attention_heads")),
        d_mlp=int(hf_require(hf, "intermediate_size")),
        d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "max_position_embeddings") or 512),
        architecture="encoder", positional="learned", norm="layernorm", norm_placement="post",
        norm_eps=float(hf_get(hf, "layer_norm_eps", 1e-12)), embed_norm=True, final_norm=False,
        n_token_types=int(hf_get(hf, "type_vocab_size", 2) or 0),
        act=act_name(hf_get(hf, "hidden_act", "gelu")),
        has_unembed=mlm, mlm_head=mlm,
        tie_embeddings=mlm and bool(hf_get(hf, "tie_word_embeddings", True)),
        unembed_bias=mlm, extra={"hf_model_type": "bert"},
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = detect_prefix(state_dict.keys(), ("bert.", ""), "embeddings.word_embeddings.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    d, m = cfg.d_model, cfg.d_mlp
    e = "embeddings."
    out = {
        "embed.W_E": t.take(e + "word_embeddings.weight", (cfg.d_vocab, d)),
        "pos_embed.W_pos": t.take(e + "position_embeddings.weight", (cfg.n_ctx, d)),
        "ln_embed.w": t.take(e + "LayerNorm.weight", (d,)),
        "ln_embed.b": t.take(e + "LayerNorm.bias", (d,)),
    }
    if cfg.n_token_types:
        out["token_type_embed.W_E"] = t.take(e + "token_type_embeddings.weight",
                                             (cfg.n_token_types, d))
    for i in range(cfg.n_layers):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        a = p + "attention.self."
        qkv = ("query", "key", "value")
        out[q + "attn.qkv.weight"] = torch.cat([t.take(a + n + ".weight", (d, d)) for n in qkv])
        out[q + "attn.qkv.bias"] = torch.cat([t.take(a + n + ".bias", (d,)) for n in qkv])
        out[q + "attn.o.weight"] = t.take(p + "attention.output.dense.weight", (d, d))
        out[q + "attn.o.bias"] = t.take(p + "attention.output.dense.bias", (d,))
        out[q + "ln1.w"] = t.take(p + "attention.output.LayerNorm.weight", (d,))
        out[q + "ln1.b"] = t.take(p + "attention.output.LayerNorm.bias", (d,))
        out[q + "mlp.fc_in.weight"] = t.take(p + "intermediate.dense.weight", (m, d))
        out[q + "mlp.fc_in.bias"] = t.take(p + "intermediate.dense.bias", (m,))
        out[q + "mlp.fc_out.weight"] = t.take(p + "output.dense.weight", (d, m))
        out[q + "mlp.fc_out.bias"] = t.take(p + "output.dense.bias", (d,))
        out[q + "ln2.w"] = t.take(p + "output.LayerNorm.weight", (d,))
        out[q + "ln2.b"] = t.take(p + "output.LayerNorm.bias", (d,))
    if cfg.mlm_head:
        c = "cls.predictions."
        out["mlm_head.dense.weight"] = t.take(c + "transform.dense.weight", (d, d), absolute=True)
        out["mlm_head.dense.bias"] = t.take(c + "transform.dense.bias", (d,), absolute=True)
        out["mlm_head.ln.w"] = t.take(c + "transform.LayerNorm.weight", (d,), absolute=True)
        out["mlm_head.ln.b"] = t.take(c + "transform.LayerNorm.bias", (d,), absolute=True)
        bias_name = c + "bias" if t.has(c + "bias", absolute=True) else c + "decoder.bias"
        out["unembed.b_U"] = t.take(bias_name, (cfg.d_vocab,), absolute=True)
        t.skip(c + "decoder.bias", absolute=True)  # the same tensor as cls.predictions.bias
        if cfg.tie_embeddings:
            t.skip(c + "decoder.weight", absolute=True)
        else:
            out["unembed.weight"] = t.take(c + "decoder.weight", (cfg.d_vocab, d), absolute=True)
    t.finish()
    return out


def dropped(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The pooler tensors a BertModel checkpoint carries that the hooked model does not use."""
    return sorted(k for k in state_dict if k.endswith(("pooler.dense.weight", "pooler.dense.bias")))
