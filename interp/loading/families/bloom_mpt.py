"""BLOOM and MPT: pre-LayerNorm decoders with ALiBi (Press et al. 2022) and no positions.

ALiBi here is the core's ``-slope * |q - k|``; BLOOM and MPT add ``slope * k`` (key position
only), which differs from it by a constant per query row, and softmax ignores a row constant:
the patterns are the same. Both use Press et al.'s slopes (MPT's ``alibi_bias_max=8``).

- BLOOM: a LayerNorm on the embeddings, q/k/v fused per head (rows ``[head, (q k v), d_head]``,
  reordered to the core's ``[q; k; v]``), GELU-tanh, biases everywhere.
- MPT: LayerNorms without bias, q/k/v fused as ``[q; k; v]`` (the core's layout), exact GELU,
  no biases, FFN ``4 * d_model`` (transformers' ``MptMLP`` ignores ``expansion_ratio``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.loading._common import (
    Tensors,
    detect_prefix,
    has_lm_head,
    hf_get,
    hf_require,
    make_config,
)


def _attn_config(hf: Any, name: str, default: Any = None) -> Any:
    return hf_get(hf_get(hf, "attn_config") or {}, name, default)


def config_from_hf(hf: Any) -> ModelConfig:
    """BLOOM / MPT config.json -> ModelConfig."""
    mt = hf_get(hf, "model_type")
    common = dict(positional="alibi", norm="layernorm", has_unembed=has_lm_head(hf),
                  tie_embeddings=has_lm_head(hf) and bool(hf_get(hf, "tie_word_embeddings", True)),
                  extra={"hf_model_type": mt})
    if mt == "bloom":
        if hf_get(hf, "apply_residual_connection_post_layernorm", False):
            raise InterpError("BLOOM checkpoints with apply_residual_connection_post_layernorm "
                              "are not supported (the residual is taken after the norm).")
        d = int(hf_require(hf, "hidden_size"))
        return make_config(
            n_layers=int(hf_require(hf, "n_layer")), d_model=d,
            n_heads=int(hf_require(hf, "n_head")), d_mlp=4 * d,
            d_vocab=int(hf_require(hf, "vocab_size")),
            n_ctx=int(hf_get(hf, "seq_length") or 2048), embed_norm=True,
            norm_eps=float(hf_get(hf, "layer_norm_epsilon", 1e-5)), act="gelu_tanh", **common)
    for name, want in (("alibi", True), ("clip_qkv", None), ("qk_ln", False),
                       ("alibi_bias_max", 8)):
        got = _attn_config(hf, name, want)
        if got != want and not (want is False and not got):
            raise InterpError(f"MPT checkpoints with attn_config.{name}={got!r} are not "
                              f"supported (implemented: {want!r}).")
    d = int(hf_require(hf, "d_model"))
    scale = _attn_config(hf, "softmax_scale")
    return make_config(
        n_layers=int(hf_require(hf, "n_layers")), d_model=d, n_heads=int(hf_require(hf, "n_heads")),
        d_mlp=4 * d, d_vocab=int(hf_require(hf, "vocab_size")),
        n_ctx=int(hf_get(hf, "max_seq_len") or 2048),
        norm_eps=float(hf_get(hf, "layer_norm_epsilon", 1e-5)), norm_bias=False, act="gelu",
        attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        attn_scale=float(scale) if scale is not None else None, **common)


def _ln(t: Tensors, name: str, d: int, out: dict[str, torch.Tensor], q: str,
        bias: bool = True) -> None:
    out[q + ".w"] = t.take(name + ".weight", (d,))
    if bias:
        out[q + ".b"] = t.take(name + ".bias", (d,))


def _ends(t: Tensors, cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    if not cfg.has_unembed:
        return
    if cfg.tie_embeddings:
        t.skip("lm_head.weight", absolute=True)
    else:
        out["unembed.weight"] = t.take("lm_head.weight", (cfg.d_vocab_out, cfg.d_model),
                                       absolute=True)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """BLOOM / MPT HF tensors -> core tensors."""
    if cfg.extra.get("hf_model_type") == "mpt":
        return _convert_mpt(state_dict, cfg)
    prefix = detect_prefix(state_dict.keys(), ("transformer.", ""), "word_embeddings.weight")
    t = Tensors(state_dict, prefix)
    d, m, nh, dh = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head
    out = {"embed.W_E": t.take("word_embeddings.weight", (cfg.d_vocab, d))}
    _ln(t, "word_embeddings_layernorm", d, out, "ln_embed")
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        _ln(t, p + "input_layernorm", d, out, q + "ln1")
        _ln(t, p + "post_attention_layernorm", d, out, q + "ln2")
        a = p + "self_attention."
        w = t.take(a + "query_key_value.weight", (3 * d, d))
        b = t.take(a + "query_key_value.bias", (3 * d,))
        # per head [q k v] -> [q of all heads; k ...; v ...]
        out[q + "attn.qkv.weight"] = w.view(nh, 3, dh, d).transpose(0, 1).reshape(3 * d, d)
        out[q + "attn.qkv.bias"] = b.view(nh, 3, dh).transpose(0, 1).reshape(3 * d)
        out[q + "attn.o.weight"] = t.take(a + "dense.weight", (d, d))
        out[q + "attn.o.bias"] = t.take(a + "dense.bias", (d,))
        out[q + "mlp.fc_in.weight"] = t.take(p + "mlp.dense_h_to_4h.weight", (m, d))
        out[q + "mlp.fc_in.bias"] = t.take(p + "mlp.dense_h_to_4h.bias", (m,))
        out[q + "mlp.fc_out.weight"] = t.take(p + "mlp.dense_4h_to_h.weight", (d, m))
        out[q + "mlp.fc_out.bias"] = t.take(p + "mlp.dense_4h_to_h.bias", (d,))
    _ln(t, "ln_f", d, out, "ln_final")
    _ends(t, cfg, out)
    t.finish()
    return out


def _convert_mpt(state_dict: Mapping[str, torch.Tensor],
                 cfg: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = detect_prefix(state_dict.keys(), ("transformer.", ""), "wte.weight")
    t = Tensors(state_dict, prefix)
    d, m = cfg.d_model, cfg.d_mlp
    out = {"embed.W_E": t.take("wte.weight", (cfg.d_vocab, d))}
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"blocks.{i}."
        _ln(t, p + "norm_1", d, out, q + "ln1", bias=False)
        _ln(t, p + "norm_2", d, out, q + "ln2", bias=False)
        out[q + "attn.qkv.weight"] = t.take(p + "attn.Wqkv.weight", (3 * d, d))
        out[q + "attn.o.weight"] = t.take(p + "attn.out_proj.weight", (d, d))
        out[q + "mlp.fc_in.weight"] = t.take(p + "ffn.up_proj.weight", (m, d))
        out[q + "mlp.fc_out.weight"] = t.take(p + "ffn.down_proj.weight", (d, m))
    _ln(t, "norm_f", d, out, "ln_final", bias=False)
    _ends(t, cfg, out)
    t.finish()
    return out
