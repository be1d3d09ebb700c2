"""T5 (Raffel et al. 2020): encoder-decoder, relative position bias, RMSNorm, no biases.

T5 attention does not scale scores by 1/sqrt(d_head) (``attn_scale=1.0``; the scale is folded
into its initialisation). Each stack's first block owns the relative attention bias, shared by
all its layers (``encoder_rel_bias`` / ``decoder_rel_bias``, [bucket, head]). With tied
embeddings the decoder output is multiplied by ``d_model ** -0.5`` before the unembedding
(``logit_scale``). ``feed_forward_proj="gated-gelu"`` (T5 v1.1) is GeGLU with ``wi_0`` the gate.

transformers 5 rewrites ``tie_word_embeddings=false`` (T5 v1.1) into ``tie_word_embeddings=true``
plus ``scale_decoder_outputs=false`` and always ties ``lm_head`` to ``shared``; the original
choice survives as ``scale_decoder_outputs``, which is what decides tying and scaling here. An
untied checkpoint without ``lm_head.weight`` (saved by transformers 5) uses ``shared.weight``,
as transformers does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.loading._common import Tensors, act_name, hf_get, hf_require, make_config

IGNORED = ()


def config_from_hf(hf: Any) -> ModelConfig:
    proj = str(hf_get(hf, "feed_forward_proj", "relu"))
    gated = proj.startswith("gated-")
    base = proj.split("-")[-1]
    if base not in ("relu", "gelu", "silu") and hf_get(hf, "dense_act_fn") is None:
        raise InterpError(f"T5 feed_forward_proj {proj!r} is not supported; use 'relu' or "
                          "'gated-gelu'.")
    act = act_name(hf_get(hf, "dense_act_fn") or base, gated=gated)
    d = int(hf_require(hf, "d_model"))
    scale = hf_get(hf, "scale_decoder_outputs")
    tied = bool(scale) if scale is not None else bool(hf_get(hf, "tie_word_embeddings", True))
    n_layers = int(hf_require(hf, "num_layers"))
    return make_config(
        n_layers=n_layers, n_decoder_layers=int(hf_get(hf, "num_decoder_layers") or n_layers),
        d_model=d, n_heads=int(hf_require(hf, "num_heads")), d_head=int(hf_require(hf, "d_kv")),
        d_mlp=int(hf_require(hf, "d_ff")),
        d_vocab=int(hf_require(hf, "vocab_size")), n_ctx=int(hf_get(hf, "n_positions") or 512),
        architecture="encoder_decoder", positional="relative",
        relative_buckets=int(hf_get(hf, "relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf_get(hf, "relative_attention_max_distance", 128)),
        norm="rmsnorm", norm_bias=False, norm_eps=float(hf_get(hf, "layer_norm_epsilon", 1e-6)),
        act=act,
        attn_scale=1.0, attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False,
        tie_embeddings=tied, logit_scale=d**-0.5 if tied else 1.0,
        extra={"hf_model_type": "t5",
               "decoder_start_token_id": int(hf_get(hf, "decoder_start_token_id", 0) or 0)},
    )


def _attn(t: Tensors, p: str, cfg: ModelConfig, out: dict[str, torch.Tensor], q: str,
          cross: bool) -> None:
    d, inner = cfg.d_model, cfg.n_heads * cfg.d_head
    w = {n: t.take(f"{p}{n}.weight", (inner, d)) for n in ("q", "k", "v")}
    if cross:
        out[q + "q_proj.weight"] = w["q"]
        out[q + "kv_proj.weight"] = torch.cat([w["k"], w["v"]])
    else:
        out[q + "qkv.weight"] = torch.cat([w["q"], w["k"], w["v"]])
    out[q + "o.weight"] = t.take(p + "o.weight", (d, inner))


def _ffn(t: Tensors, p: str, cfg: ModelConfig, out: dict[str, torch.Tensor], q: str) -> None:
    d, m = cfg.d_model, cfg.d_mlp
    if cfg.is_gated:
        out[q + "fc_in.weight"] = torch.cat([t.take(p + "wi_0.weight", (m, d)),
                                             t.take(p + "wi_1.weight", (m, d))])
    else:
        out[q + "fc_in.weight"] = t.take(p + "wi.weight", (m, d))
    out[q + "fc_out.weight"] = t.take(p + "wo.weight", (d, m))


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = Tensors(state_dict, "", ignore=IGNORED)
    d = cfg.d_model
    shared = t.take("shared.weight", (cfg.d_vocab, d))
    out = {"embed.W_E": shared}
    t.skip("encoder.embed_tokens.weight")  # tied copies of shared.weight
    t.skip("decoder.embed_tokens.weight")
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[f"{stack}_rel_bias.W_rel"] = t.take(rel, (cfg.relative_buckets, cfg.n_heads))
        for i in range(n):
            p, q = f"{stack}.block.{i}.layer.", f"{stack}.{i}."
            _attn(t, p + "0.SelfAttention.", cfg, out, q + "attn.", cross=False)
            out[q + "ln1.w"] = t.take(p + "0.layer_norm.weight", (d,))
            ff = 1
            if stack == "decoder":
                _attn(t, p + "1.EncDecAttention.", cfg, out, q + "cross_attn.", cross=True)
                out[q + "ln_cross.w"] = t.take(p + "1.layer_norm.weight", (d,))
                ff = 2
            _ffn(t, f"{p}{ff}.DenseReluDense.", cfg, out, q + "mlp.")
            out[q + "ln2.w"] = t.take(f"{p}{ff}.layer_norm.weight", (d,))
    out["encoder_final_ln.w"] = t.take("encoder.final_layer_norm.weight", (d,))
    out["ln_final.w"] = t.take("decoder.final_layer_norm.weight", (d,))
    if cfg.tie_embeddings:
        t.skip("lm_head.weight")
    elif t.has("lm_head.weight"):
        out["unembed.weight"] = t.take("lm_head.weight", (cfg.d_vocab, d))
    else:
        # transformers 5 ties lm_head to shared even for untied (v1.1) configs, saving no lm_head
        out["unembed.weight"] = shared.clone()
    t.finish()
    return out
