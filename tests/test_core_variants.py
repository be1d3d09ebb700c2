"""Every documented variant value builds, runs forward and backward, and round-trips its config.

One tiny model per value (2 layers, d_model 16, 4 heads): the point is that each code path runs
and trains (finite loss, finite gradient on every parameter that the forward used), not
numerics; the numerical invariants live in tests/test_core_invariants.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from interp import HookedEncoderDecoder, HookedTransformer, ModelConfig, build_model, masks

BASE = dict(n_layers=2, d_model=16, n_heads=4, d_vocab=37, n_ctx=16)

VARIANTS: dict[str, dict] = {
    # positions
    "pos_none": dict(positional="none"),
    "pos_sinusoidal": dict(positional="sinusoidal"),
    "pos_learned": dict(positional="learned"),
    "rope_full": dict(positional="rope"),
    "rope_partial": dict(positional="rope", rotary_dim=2),
    "rope_interleaved": dict(positional="rope", rope_interleaved=True),
    "rope_partial_interleaved": dict(
        positional="rope", rotary_dim=2, rope_interleaved=True, rope_base=500.0
    ),
    "alibi": dict(positional="alibi"),
    "alibi_3_heads": dict(positional="alibi", n_heads=3, d_model=12),
    "relative": dict(positional="relative", relative_buckets=8, relative_max_distance=16),
    "relative_encoder": dict(positional="relative", architecture="encoder"),
    # norms
    "layernorm_pre": dict(norm="layernorm"),
    "layernorm_post": dict(norm="layernorm", norm_placement="post"),
    "rmsnorm_pre": dict(norm="rmsnorm"),
    "rmsnorm_post": dict(norm="rmsnorm", norm_placement="post"),
    "norm_none": dict(norm="none"),
    "norm_none_post": dict(norm="none", norm_placement="post"),
    "embed_norm": dict(embed_norm=True),
    "layernorm_no_bias": dict(norm_bias=False),
    "no_final_norm": dict(final_norm=False),
    "qk_norm_full": dict(qk_norm="full", n_kv_heads=2),
    "qk_norm_head": dict(qk_norm="head", n_kv_heads=2),
    # FFN activations
    **{
        f"act_{a}": dict(act=a)
        for a in ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "reglu")
    },
    "d_mlp_free": dict(d_mlp=24, act="swiglu"),
    "no_biases": dict(attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False, norm="rmsnorm"),
    # heads
    "mha": dict(n_kv_heads=4),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "d_head_free": dict(d_head=6),
    "parallel": dict(parallel_attn_mlp=True),
    "parallel_gqa_rope": dict(
        parallel_attn_mlp=True, n_kv_heads=2, positional="rope", rotary_dim=2
    ),
    "attn_only": dict(attn_only=True),
    # architectures
    "decoder": dict(architecture="decoder"),
    "encoder": dict(architecture="encoder"),
    "encoder_bert": dict(
        architecture="encoder",
        norm_placement="post",
        embed_norm=True,
        n_token_types=2,
        mlm_head=True,
        final_norm=False,
        tie_embeddings=True,
    ),
    "bare_encoder": dict(architecture="encoder", has_unembed=False),
    "encoder_decoder": dict(architecture="encoder_decoder", n_decoder_layers=1),
    "encoder_decoder_t5": dict(
        architecture="encoder_decoder",
        positional="relative",
        norm="rmsnorm",
        act="geglu",
        attn_scale=1.0,
        tie_embeddings=True,
        logit_scale=0.25,
    ),
    "encoder_decoder_gqa_rope": dict(
        architecture="encoder_decoder", positional="rope", n_kv_heads=2
    ),
    # kernels
    **{f"kernel_{k}": dict(attn_kernel=k) for k in ("auto", "eager", "sdpa", "linear")},
    "kernel_linear_relu_map": dict(attn_kernel="linear", linear_feature_map="relu"),
    "kernel_linear_encoder": dict(attn_kernel="linear", architecture="encoder"),
    "kernel_linear_rope_gqa": dict(attn_kernel="linear", positional="rope", n_kv_heads=2),
    # masks
    "mask_causal": dict(mask="causal"),
    "mask_bidirectional": dict(mask="bidirectional"),
    "mask_prefix": dict(mask="prefix_lm:3"),
    "mask_sliding_window": dict(mask="causal&sliding_window:3"),
    "mask_sliding_window_bidir": dict(mask="sliding_window:2", architecture="encoder"),
    "mask_block_sparse": dict(mask="causal&block_sparse:4"),
    "mask_strided": dict(mask="causal&strided:3"),
    "mask_composed": dict(
        mask=(masks.causal() & masks.block_sparse(4)) | (masks.causal() & masks.strided(4))
    ),
    "mask_negated": dict(mask=masks.causal() & ~masks.strided(5)),
    "soft_penalty": dict(soft_mask_penalty=3.0),
    "soft_penalty_sdpa": dict(
        soft_mask_penalty=3.0, attn_kernel="sdpa", mask="causal&sliding_window:2"
    ),
    "temperature": dict(attn_temperature=0.5),
    "attn_scale": dict(attn_scale=0.3),
    # MoE
    "moe_softmax_topk": dict(n_experts=4, experts_per_token=2, router="softmax_topk"),
    "moe_topk_softmax": dict(n_experts=4, experts_per_token=2, router="topk_softmax"),
    "moe_no_renorm": dict(n_experts=4, experts_per_token=2, router_renormalize=False),
    "moe_shared": dict(n_experts=4, n_shared_experts=2, d_shared_expert=8),
    "moe_shared_gate": dict(n_experts=4, n_shared_experts=1, shared_expert_gate=True, act="swiglu"),
    "moe_layers_subset": dict(n_experts=3, experts_per_token=1, moe_layers=(1,), d_expert=8),
    "moe_z_loss": dict(n_experts=4, router_z_loss_coef=0.1),
    "moe_encoder": dict(n_experts=2, architecture="encoder", experts_per_token=1),
    # embeddings / unembedding
    "tied": dict(tie_embeddings=True),
    "unembed_bias": dict(unembed_bias=True, d_vocab_out=41),
    "token_types": dict(n_token_types=3),
}


def make(kw: dict) -> HookedTransformer | HookedEncoderDecoder:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw}))


def run(model, tokens: torch.Tensor, **kw) -> torch.Tensor:
    if model.cfg.architecture == "encoder_decoder":
        return model(tokens, tokens[:, :5], **kw)
    return model(tokens, **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_forward_backward(name: str) -> None:
    model = make(VARIANTS[name])
    cfg = model.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    if not cfg.has_unembed:
        out = model(tokens, return_type="hidden")
        assert out.shape == (2, 9, cfg.d_model)
        loss = out.pow(2).mean()
    elif cfg.architecture == "decoder":
        logits, loss = model(tokens, return_type="both")
        assert logits.shape == (2, 9, cfg.d_vocab_out)
    elif cfg.architecture == "encoder":
        labels = torch.full_like(tokens, -100)
        labels[:, 2] = tokens[:, 2]
        logits, loss = model(tokens, return_type="both", labels=labels)
        assert logits.shape == (2, 9, cfg.d_vocab_out)
    else:
        logits, loss = model(tokens, tokens[:, :5], return_type="both")
        assert logits.shape == (2, 5, cfg.d_vocab_out)
    assert loss.ndim == 0 and torch.isfinite(loss)
    if cfg.is_moe:
        moe = model.moe_losses()
        assert torch.isfinite(moe["aux"]) and torch.isfinite(moe["z"])
        assert moe["aux"] > 0
        loss = loss + moe["aux"] + moe["z"]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # every parameter reaches the loss, except experts the router happened not to pick,
    # and the MLM-head-free path of an encoder without unembed
    missing = [n for n, g in grads.items() if g is None and ".experts." not in n]
    assert not missing, missing
    # training moves the loss: one SGD step on the same batch lowers it
    if cfg.has_unembed and cfg.architecture == "decoder":
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            assert model(tokens, return_type="loss") < loss


@pytest.mark.parametrize(
    "name",
    [
        "decoder",
        "gqa",
        "rope_partial",
        "alibi",
        "relative",
        "kernel_linear",
        "mask_sliding_window",
        "moe_shared_gate",
        "parallel",
    ],
)
def test_kv_cache_variant_runs(name: str) -> None:
    """Generation runs for every decoder family (the exact equality is an invariant test)."""
    model = make(VARIANTS[name])
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [1, 2, 3]


def test_encoder_decoder_generate_runs() -> None:
    model = make(VARIANTS["encoder_decoder_t5"])
    out = model.generate(torch.tensor([[4, 5, 6, 7]]), max_new_tokens=3)
    assert out.shape == (1, 4) and out[0, 0] == 0


REPRESENTATIVE = {
    "dense_decoder": {},
    "gqa_rope_rmsnorm_swiglu": VARIANTS["qk_norm_head"]
    | dict(positional="rope", norm="rmsnorm", act="swiglu", rotary_dim=2),
    "bert_encoder": VARIANTS["encoder_bert"],
    "moe": VARIANTS["moe_layers_subset"]
    | dict(router="topk_softmax", n_shared_experts=1, shared_expert_gate=True),
    "encoder_decoder": VARIANTS["encoder_decoder_t5"],
    "linear": VARIANTS["kernel_linear_rope_gqa"],
    "composed_mask": VARIANTS["mask_composed"],
    "negated_mask": VARIANTS["mask_negated"] | dict(soft_mask_penalty=2.5, attn_temperature=0.7),
    "prefix_alibi": dict(mask="prefix_lm:4", positional="alibi"),
}


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_config_round_trip(name: str) -> None:
    cfg = ModelConfig(**{**BASE, **REPRESENTATIVE[name]}, extra={"source": "test"})
    d = json.loads(json.dumps(cfg.to_dict()))  # must be JSON-able
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert str(back.mask) == str(cfg.mask)
    assert back.to_dict() == cfg.to_dict()
    # the rebuilt config builds the same model: same state-dict keys and shapes
    a, b = build_model(cfg), build_model(back)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_config_defaults_and_replace() -> None:
    import dataclasses

    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
    assert (cfg.d_head, cfg.d_mlp, cfg.n_kv_heads, cfg.d_vocab_out) == (16, 256, 4, 100)
    assert str(cfg.mask) == "causal" and cfg.positional == "learned" and cfg.attn_kernel == "auto"
    enc = dataclasses.replace(cfg, architecture="encoder", mask=None)
    assert str(enc.mask) == "bidirectional"
    assert ModelConfig(**BASE, positional="rope").rotary_dim == BASE["d_model"] // BASE["n_heads"]
    moe = ModelConfig(**BASE, n_experts=3)
    assert moe.moe_layers == (0, 1) and moe.d_expert == moe.d_mlp
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3  # type: ignore[misc]
