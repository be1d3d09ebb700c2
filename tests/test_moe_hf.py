"""Routing parity with transformers: tiny random Mixtral and OLMoE built offline, saved as
Hugging Face folders, loaded through ``interp.load_pretrained``. Our router logits and top-k
experts must equal transformers' for every token, so every metric of analyses/moe/, which
reads only those hooks, holds for real MoE checkpoints of these families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from analyses import moe

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        "MixtralTopKRouter",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        "OlmoeTopKRouter",
        {
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
}


def _loader_supports(model_type: str) -> str | None:
    """None when interp can load this family, else the reason it cannot (yet)."""
    try:
        from interp.loading import supported_model_types
    except ImportError as e:
        return f"interp.loading is not available ({e})"
    if model_type not in supported_model_types():
        return f"interp.loading has no {model_type!r} family yet (loading issue)"
    return None


def _build_hf(model_type: str, folder) -> torch.nn.Module:
    cfg_name, model_name, _, extra = FAMILIES[model_type]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(cfg).eval()
    with (
        torch.no_grad()
    ):  # random init gives near-tied routers; widen them so top-k is well defined
        for name, p in hf.named_parameters():
            if name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
                p.normal_(0, 1.0)
    hf.save_pretrained(folder)
    return hf


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_routing_equals_transformers(model_type, tmp_path):
    reason = _loader_supports(model_type)
    if reason:
        pytest.skip(reason)
    hf = _build_hf(model_type, tmp_path / model_type)
    ours = interp.load_pretrained(str(tmp_path / model_type)).eval()
    layers = moe.moe_layers(ours)
    assert layers == list(range(hf.config.num_hidden_layers))
    tokens = torch.randint(
        0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1)
    )

    router_cls = getattr(
        transformers.models.__dict__[model_type], f"modeling_{model_type}"
    ).__dict__[FAMILIES[model_type][2]]
    got_hf: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(
            lambda mod, inp, out: got_hf.append((out[0].detach(), out[2].detach()))
        )
        for m in hf.modules()
        if isinstance(m, router_cls)
    ]
    with torch.no_grad():
        out = hf(tokens, output_router_logits=True)
    for h in handles:
        h.remove()
    assert len(got_hf) == len(layers) and len(out.router_logits) == len(layers)

    names = [
        f"blocks.{layer}.mlp.{h}"
        for layer in layers
        for h in ("hook_router_logits", "hook_expert_indices")
    ]
    _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n in names)
    k = hf.config.num_experts_per_tok
    for layer, (hf_logits, hf_idx) in zip(layers, got_hf, strict=True):
        our_logits = cache[f"blocks.{layer}.mlp.hook_router_logits"].reshape(
            -1, hf_logits.shape[-1]
        )
        torch.testing.assert_close(our_logits, hf_logits.float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            our_logits,
            out.router_logits[layer].float().reshape(our_logits.shape),
            atol=1e-4,
            rtol=1e-4,
        )
        # the selection must be decided by a margin far above the numerical difference of the
        # logits, or equal indices would be luck
        srt = hf_logits.float().sort(-1, descending=True).values
        diff = float((our_logits - hf_logits.float()).abs().max())
        assert float((srt[:, k - 1] - srt[:, k]).min()) > 10 * diff + 1e-6
        our_idx = cache[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(-1, k)
        # same experts for every token, in the same order (first choice first)
        assert torch.equal(our_idx, hf_idx), (
            f"layer {layer}: {(our_idx != hf_idx).any(-1).sum()} tokens differ"
        )

    # and the analysis counts what transformers routed
    res = moe.routing_stats(ours, [tokens], n_perm=0)
    for layer, (_, hf_idx) in zip(layers, got_hf, strict=True):
        load = res.load[res.load["layer"] == layer].sort_values("expert")
        np.testing.assert_array_equal(
            load["tokens_top1"].to_numpy(), np.bincount(hf_idx[:, 0].numpy(), minlength=len(load))
        )
        np.testing.assert_array_equal(
            load["tokens_topk"].to_numpy(),
            np.bincount(hf_idx.reshape(-1).numpy(), minlength=len(load)),
        )
