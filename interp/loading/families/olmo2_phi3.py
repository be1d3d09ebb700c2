"""OLMo 2 and Phi-3: Llama-like decoders with one structural twist each.

- OLMo 2 (OLMo et al. 2024): no norm before a sub-layer, an RMSNorm after it inside the
  residual branch (``norm_placement="post_branch"``: ``x + ln1_post(attn(x))``), q and k
  RMS-normalised over the whole projection (``qk_norm="full"``).
- Phi-3: q, k, v fused in one ``qkv_proj`` and gate and up in one ``gate_up_proj`` (the core's
  own layouts), partial rotary, LongRoPE (``rope_scaling`` type ``longrope``), and a sliding
  window on every layer where ``sliding_window`` is set.
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
    hf_get,
    hf_require,
    make_config,
    rope_partial_factor,
)
from interp.loading.families.llama import (
    IGNORED,
    decoder_fields,
    take_ends,
    take_gated_mlp,
)


def config_from_hf(hf: Any) -> ModelConfig:
    """OLMo 2 / Phi-3 config.json -> ModelConfig."""
    mt = hf_get(hf, "model_type")
    fields = decoder_fields(hf)
    fields.update(d_mlp=int(hf_require(hf, "intermediate_size")),
                  act=act_name(hf_get(hf, "hidden_act", "silu"), gated=True), mlp_bias=False)
    if mt == "olmo2":
        fields.update(norm_placement="post_branch", qk_norm="full")
    else:  # phi3
        fields["rotary_dim"] = int(fields["d_head"] * rope_partial_factor(hf))
    return make_config(**fields)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """OLMo 2 / Phi-3 HF tensors -> core tensors."""
    prefix = detect_prefix(state_dict.keys(), ("model.", ""), "embed_tokens.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    d, nh, nkv, dh, m = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    out: dict[str, torch.Tensor] = {}
    olmo2 = cfg.extra.get("hf_model_type") == "olmo2"
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        a = p + "self_attn."
        if olmo2:
            out[q + "attn.qkv.weight"] = fuse_qkv(t.take(a + "q_proj.weight", (nh * dh, d)),
                                                  t.take(a + "k_proj.weight", (nkv * dh, d)),
                                                  t.take(a + "v_proj.weight", (nkv * dh, d)))
            out[q + "attn.o.weight"] = t.take(a + "o_proj.weight", (d, nh * dh))
            out[q + "attn.q_norm.w"] = t.take(a + "q_norm.weight", (nh * dh,))
            out[q + "attn.k_norm.w"] = t.take(a + "k_norm.weight", (nkv * dh,))
            out[q + "ln1_post.w"] = t.take(p + "post_attention_layernorm.weight", (d,))
            out[q + "ln2_post.w"] = t.take(p + "post_feedforward_layernorm.weight", (d,))
            take_gated_mlp(t, p + "mlp.", d, m, False, out, q + "mlp.")
            continue
        out[q + "attn.qkv.weight"] = t.take(a + "qkv_proj.weight", ((nh + 2 * nkv) * dh, d))
        out[q + "attn.o.weight"] = t.take(a + "o_proj.weight", (d, nh * dh))
        out[q + "ln1.w"] = t.take(p + "input_layernorm.weight", (d,))
        out[q + "ln2.w"] = t.take(p + "post_attention_layernorm.weight", (d,))
        out[q + "mlp.fc_in.weight"] = t.take(p + "mlp.gate_up_proj.weight", (2 * m, d))
        out[q + "mlp.fc_out.weight"] = t.take(p + "mlp.down_proj.weight", (d, m))
    take_ends(t, cfg, out)
    t.finish()
    return out

