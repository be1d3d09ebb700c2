"""Mixture-of-experts decoders: Mixtral (Jiang et al. 2024), Qwen2-MoE, OLMoE (Muennighoff et
al. 2024).

All three route with a softmax over experts, then top-k (``router="softmax_topk"``); Mixtral
renormalises the top-k weights, Qwen2-MoE and OLMoE only when ``norm_topk_prob``. Qwen2-MoE adds
one always-on shared expert scaled by ``sigmoid(shared_expert_gate(x))`` and may keep some layers
dense (``decoder_sparse_step``, ``mlp_only_layers``); OLMoE RMS-normalises q and k over the whole
projection (``qk_norm="full"``).

Expert tensors come in two layouts: on disk (``save_pretrained``) one module per expert
(Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, the others ``mlp.experts.{e}.gate_proj/
up_proj/down_proj``); in memory (transformers 5) fused ``mlp.experts.gate_up_proj`` [E, 2I, H]
(rows [gate; up], the core's own ``fc_in`` layout) and ``mlp.experts.down_proj`` [E, H, I].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.loading._common import Tensors, act_name, detect_prefix, hf_get, hf_require, make_config
from interp.loading.families.llama import (
    IGNORED,
    decoder_fields,
    take_attention,
    take_ends,
    take_gated_mlp,
)


def config_from_hf(hf: Any) -> ModelConfig:
    mt = hf_get(hf, "model_type")
    fields = decoder_fields(hf)
    act = act_name(hf_get(hf, "hidden_act", "silu"), gated=True)
    fields.update(act=act, mlp_bias=False, router="softmax_topk",
                  experts_per_token=int(hf_require(hf, "num_experts_per_tok")),
                  moe_aux_loss_coef=float(hf_get(hf, "router_aux_loss_coef", 0.01) or 0.0))
    if mt == "mixtral":
        fields.update(n_experts=int(hf_require(hf, "num_local_experts")),
                      d_mlp=int(hf_require(hf, "intermediate_size")), router_renormalize=True)
    elif mt == "olmoe":
        if hf_get(hf, "clip_qkv") is not None:
            raise InterpError("OLMoE checkpoints with clip_qkv are not supported (q/k/v clamping "
                              "is not implemented).")
        fields.update(n_experts=int(hf_require(hf, "num_experts")),
                      d_mlp=int(hf_require(hf, "intermediate_size")),
                      router_renormalize=bool(hf_get(hf, "norm_topk_prob", False)), qk_norm="full")
    elif mt == "qwen2_moe":
        n_layers, step = fields["n_layers"], int(hf_get(hf, "decoder_sparse_step", 1) or 1)
        dense = set(hf_get(hf, "mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
        if not moe_layers:
            raise InterpError("This Qwen2-MoE config has no MoE layer (decoder_sparse_step / "
                              "mlp_only_layers); load it as qwen2.")
        fields.update(n_experts=int(hf_require(hf, "num_experts")),
                      d_mlp=int(hf_require(hf, "intermediate_size")),
                      d_expert=int(hf_require(hf, "moe_intermediate_size")), n_shared_experts=1,
                      d_shared_expert=int(hf_require(hf, "shared_expert_intermediate_size")),
                      shared_expert_gate=True,
                      router_renormalize=bool(hf_get(hf, "norm_topk_prob", False)),
                      moe_layers=moe_layers)
    elif mt == "qwen3_moe":  # Qwen2-MoE's routing without the shared expert; q/k norm per head
        fields.update(n_experts=int(hf_require(hf, "num_experts")),
                      d_mlp=int(hf_require(hf, "intermediate_size")),
                      d_expert=int(hf_require(hf, "moe_intermediate_size")),
                      router_renormalize=bool(hf_get(hf, "norm_topk_prob", False)),
                      moe_layers=_sparse_layers(hf, fields["n_layers"]))
    else:  # pragma: no cover - the registry only sends these four here
        raise InterpError(f"{mt!r} is not an MoE family.")
    return make_config(**fields)


def _sparse_layers(hf: Any, n_layers: int) -> tuple[int, ...]:
    """The MoE layers of a Qwen MoE config (``decoder_sparse_step``, ``mlp_only_layers``)."""
    step = int(hf_get(hf, "decoder_sparse_step", 1) or 1)
    dense = set(hf_get(hf, "mlp_only_layers") or [])
    layers = tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
    if not layers:
        raise InterpError("This Qwen MoE config has no MoE layer (decoder_sparse_step / "
                          "mlp_only_layers); load it as its dense family.")
    return layers


def _take_experts(t: Tensors, p: str, cfg: ModelConfig, out: dict[str, torch.Tensor], q: str,
                  names: tuple[str, str, str]) -> None:
    E, d, I = cfg.n_experts, cfg.d_model, cfg.d_expert  # noqa: E741 (transformers' name)
    if t.has(p + "experts.gate_up_proj"):  # transformers 5 in memory: fused 3-D tensors
        gu = t.take(p + "experts.gate_up_proj", (E, 2 * I, d))
        down = t.take(p + "experts.down_proj", (E, d, I))
        for e in range(E):
            out[f"{q}experts.{e}.fc_in.weight"] = gu[e]
            out[f"{q}experts.{e}.fc_out.weight"] = down[e]
        return
    for e in range(E):
        take_gated_mlp(t, f"{p}experts.{e}.", d, I, False, out, f"{q}experts.{e}.", names)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor],
                       cfg: ModelConfig) -> dict[str, torch.Tensor]:
    prefix = detect_prefix(state_dict.keys(), ("model.", ""), "embed_tokens.weight")
    t = Tensors(state_dict, prefix, ignore=IGNORED)
    mt = cfg.extra.get("hf_model_type")
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        take_attention(t, p, cfg, out, q)
        if not cfg.is_moe_layer(i):
            take_gated_mlp(t, p + "mlp.", cfg.d_model, cfg.d_mlp, False, out, q + "mlp.")
            continue
        if mt == "mixtral" and t.has(p + "block_sparse_moe.gate.weight"):  # on-disk Mixtral names
            m, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
        else:
            m, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        out[q + "mlp.router.weight"] = t.take(m + "gate.weight", (cfg.n_experts, cfg.d_model))
        _take_experts(t, m, cfg, out, q + "mlp.", names)
        if cfg.n_shared_experts:
            take_gated_mlp(t, m + "shared_expert.", cfg.d_model, cfg.d_shared_expert, False, out,
                           q + "mlp.shared.")
            out[q + "mlp.shared_gate.weight"] = t.take(m + "shared_expert_gate.weight",
                                                       (1, cfg.d_model))
    take_ends(t, cfg, out)
    t.finish()
    return out
