"""Numerical invariants of the core, proved on tiny random models (STYLE.md habit 7).

Weights are drawn larger than the default init (std 0.3, non-trivial biases and norm gains) so
that attention patterns are far from uniform and a broken mask, cache or kernel shows up as a
large difference rather than one hidden below the tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from interp import HookedTransformer, KVCache, ModelConfig, build_model, masks
from interp.components import Attention
from interp.positions import apply_rope, rope_cos_sin

BASE = dict(n_layers=2, d_model=16, n_heads=4, d_vocab=29, n_ctx=24)
POSITIONALS = ("none", "sinusoidal", "learned", "rope", "alibi", "relative")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn at random: matrices N(0, std), norm gains 1 + N(0, 0.1), biases
    N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last == "w":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def make(seed: int = 0, **kw) -> HookedTransformer:
    return randomize(build_model(ModelConfig(**{**BASE, **kw})), seed)


def toks(
    batch: int = 2, pos: int = 12, seed: int = 1, vocab: int = BASE["d_vocab"]
) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=0))


# ------------------------------------------------------------------------------------------
# hooks change nothing unless they change something
# ------------------------------------------------------------------------------------------
IDENTITY_CONFIGS = {
    "dense": {},
    "gqa_rope_rms_swiglu": dict(
        n_kv_heads=2, positional="rope", rotary_dim=2, norm="rmsnorm", act="swiglu"
    ),
    "post_norm_encoder": dict(
        architecture="encoder", norm_placement="post", embed_norm=True, n_token_types=2
    ),
    "moe": dict(n_experts=3, n_shared_experts=1, shared_expert_gate=True, act="geglu"),
    "linear": dict(attn_kernel="linear", positional="rope"),
    "alibi_parallel": dict(
        positional="alibi", parallel_attn_mlp=True, mask="causal&sliding_window:4"
    ),
    "encoder_decoder": dict(architecture="encoder_decoder", positional="relative"),
}


@pytest.mark.parametrize("name", list(IDENTITY_CONFIGS))
@pytest.mark.parametrize("kernel", ["auto", "eager"])
def test_identity_hook_on_every_point_changes_nothing(name: str, kernel: str) -> None:
    kw = IDENTITY_CONFIGS[name]
    if kw.get("attn_kernel") == "linear" and kernel == "eager":
        pytest.skip("linear attention has its own kernel")
    model = make(**{"attn_kernel": kernel, **kw})
    t = toks()
    args = (t, t[:, :7]) if model.cfg.architecture == "encoder_decoder" else (t,)
    ref = model(*args)
    calls: list[str] = []

    def identity(x, hook):
        calls.append(hook.name)
        return x

    out = model.run_with_hooks(*args, fwd_hooks=[(lambda n: True, identity)])
    assert set(calls) == set(model.hook_dict), set(model.hook_dict) - set(calls)
    # hooking the LayerNorm scale and hook_result take the explicit (unfused) path: equal to
    # rounding; auto also switches hooked layers from SDPA to eager
    assert close(out, ref)


def test_head_gates_ones_change_nothing_and_zero_equals_ablating_z() -> None:
    model = make(n_kv_heads=2, positional="rope")
    t = toks()
    ref = model(t)
    model.set_head_gates(torch.ones(2, 4))
    assert close(model(t), ref)
    gates = torch.ones(2, 4)
    gates[1, 2] = 0.0
    model.set_head_gates(gates)
    gated = model(t)
    model.set_head_gates(None)
    assert close(model(t), ref)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    ablated = model.run_with_hooks(t, fwd_hooks=[("blocks.1.attn.hook_z", ablate)])
    assert close(gated, ablated)
    assert not close(gated, ref, atol=1e-3)
    # gates that require grad give the head-importance gradient (Michel et al. 2019)
    g = torch.ones(2, 4, requires_grad=True)
    model.set_head_gates(g)
    model(t, return_type="loss").backward()
    model.set_head_gates(None)
    assert g.grad is not None and g.grad.shape == (2, 4) and bool((g.grad != 0).all())


def test_encoder_decoder_head_gates_per_stack() -> None:
    """Gates address encoder, decoder self-attention and decoder cross-attention heads
    separately."""
    model = make(architecture="encoder_decoder", positional="relative")
    src, dec = toks(pos=7), toks(pos=5, seed=4)
    ref = model(src, dec)
    gates = torch.ones(2, 4)
    gates[0, 1] = 0.0
    for stack, hook in (
        ("encoder", "encoder.0.attn.hook_z"),
        ("decoder", "decoder.0.attn.hook_z"),
        ("decoder.cross", "decoder.0.cross_attn.hook_z"),
    ):
        model.set_head_gates(gates, stack=stack)
        gated = model(src, dec)
        model.set_head_gates(None, stack=stack)
        assert close(model(src, dec), ref)

        def ablate(z, hook):
            z = z.clone()
            z[:, :, 1] = 0.0
            return z

        assert close(gated, model.run_with_hooks(src, dec, fwd_hooks=[(hook, ablate)])), stack
        assert not close(gated, ref, atol=1e-4), stack


# ------------------------------------------------------------------------------------------
# causality and windows
# ------------------------------------------------------------------------------------------
CAUSAL_MASKS = (
    "causal",
    "causal&sliding_window:3",
    "causal&block_sparse:4",
    "causal&strided:3|causal&sliding_window:2",
    "prefix_lm:0",
)


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("kernel", ["auto", "eager", "sdpa", "linear"])
def test_future_tokens_never_change_past_outputs(positional: str, kernel: str) -> None:
    mask_list = ("causal",) if kernel == "linear" else CAUSAL_MASKS
    if kernel == "linear" and positional in ("alibi", "relative"):
        pytest.skip("linear attention forms no scores to bias")
    for mask in mask_list:
        model = make(positional=positional, attn_kernel=kernel, mask=mask, n_kv_heads=2)
        t = toks(pos=12)
        ref = model(t)
        for t_cut in (0, 5, 10):
            t2 = t.clone()
            t2[:, t_cut + 1 :] = (t2[:, t_cut + 1 :] + 7) % BASE["d_vocab"]
            out = model(t2)
            assert close(out[:, : t_cut + 1], ref[:, : t_cut + 1]), (mask, t_cut)
            assert not close(out[:, t_cut + 1 :], ref[:, t_cut + 1 :], atol=1e-3)


def test_future_tokens_never_change_past_outputs_moe_and_padding() -> None:
    model = make(n_experts=3, experts_per_token=2, positional="rope")
    t = toks(pos=10)
    am = torch.ones_like(t)
    am[0, :3] = 0  # left padding
    ref = model(t, attention_mask=am)
    t2 = t.clone()
    t2[:, 6:] = (t2[:, 6:] + 3) % BASE["d_vocab"]
    out = model(t2, attention_mask=am)
    # padded query positions see no key at all; their (meaningless) outputs are excluded
    keep = am.bool()
    keep[:, 6:] = False
    assert close(out[keep], ref[keep])


@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("kernel", ["auto", "eager", "sdpa"])
def test_sliding_window_hides_t_minus_w(positional: str, kernel: str) -> None:
    w, t_q = 3, 8
    model = make(
        n_layers=1, positional=positional, attn_kernel=kernel, mask=f"causal&sliding_window:{w}"
    )
    t = toks(pos=10)
    ref = model(t)[:, t_q]
    hidden = t.clone()
    hidden[:, t_q - w] = (hidden[:, t_q - w] + 5) % BASE["d_vocab"]
    assert close(model(hidden)[:, t_q], ref)
    seen = t.clone()
    seen[:, t_q - w + 1] = (seen[:, t_q - w + 1] + 5) % BASE["d_vocab"]
    assert not close(model(seen)[:, t_q], ref, atol=1e-3)
    # the same window as a run-time override on a plain causal model
    plain = make(n_layers=1, positional=positional, attn_kernel=kernel)
    with plain.override_attention(mask=masks.causal() & masks.sliding_window(w)):
        ref2 = plain(t)[:, t_q]
        assert close(plain(hidden)[:, t_q], ref2)
        assert not close(plain(seen)[:, t_q], ref2, atol=1e-3)
    assert not close(plain(hidden)[:, t_q], ref2, atol=1e-3)  # override gone: t - w visible again


# ------------------------------------------------------------------------------------------
# heads and experts: the general code path equals the special case it generalises
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["auto", "eager", "sdpa", "linear"])
@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_gqa_equals_mha_with_repeated_kv_weights(kernel: str, positional: str) -> None:
    nh, nkv, dh = 4, 2, BASE["d_model"] // 4
    gqa = make(n_kv_heads=nkv, attn_kernel=kernel, positional=positional)
    mha = build_model(
        ModelConfig(**BASE, n_kv_heads=nh, attn_kernel=kernel, positional=positional)
    ).eval()
    sd = gqa.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            q, kk, vv = v.split([nh * dh, nkv * dh, nkv * dh], dim=0)
            rep = lambda x: (  # noqa: E731
                x.reshape(nkv, dh, *x.shape[1:])
                .repeat_interleave(nh // nkv, 0)
                .reshape(nh * dh, *x.shape[1:])
            )
            v = torch.cat([q, rep(kk), rep(vv)], 0)
        new[k] = v
    mha.load_state_dict(new)
    t = toks()
    assert close(gqa(t), mha(t))
    _, c_g = gqa.run_with_cache(t, names_filter=lambda n: n.endswith("hook_pattern"))
    _, c_m = mha.run_with_cache(t, names_filter=lambda n: n.endswith("hook_pattern"))
    assert close(c_g["pattern", 1], c_m["pattern", 1])
    # per-head views agree with the repetition
    assert close(mha.blocks[0].attn.W_K[1], gqa.blocks[0].attn.W_K[0], atol=0)
    assert close(mha.blocks[0].attn.W_K[2], gqa.blocks[0].attn.W_K[1], atol=0)


def test_gqa_with_n_kv_heads_equal_n_heads_is_mha() -> None:
    a = make(n_kv_heads=4)
    b = build_model(ModelConfig(**BASE)).eval()
    b.load_state_dict(a.state_dict())
    assert close(a(toks()), b(toks()), atol=0)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_with_one_expert_top1_equals_dense(router: str, act: str, renorm: bool) -> None:
    dense = make(act=act)
    moe = build_model(
        ModelConfig(
            **BASE,
            act=act,
            n_experts=1,
            experts_per_token=1,
            router=router,
            router_renormalize=renorm,
        )
    ).eval()
    sd = {}
    for k, v in dense.state_dict().items():
        sd[k.replace(".mlp.", ".mlp.experts.0.")] = v
    for layer in range(BASE["n_layers"]):
        sd[f"blocks.{layer}.mlp.router.weight"] = torch.randn(1, BASE["d_model"])
    moe.load_state_dict(sd)
    t = toks()
    assert close(moe(t), dense(t))
    _, cache = moe.run_with_cache(t)
    assert cache["blocks.0.mlp.experts.0.hook_post"].shape == (t.numel(), moe.cfg.d_mlp)
    assert close(
        cache["blocks.0.mlp.experts.0.hook_post"].reshape(*t.shape, -1),
        dense.run_with_cache(t)[1]["blocks.0.mlp.hook_post"],
    )


def test_set_expert_mask_removes_the_experts_tokens() -> None:
    model = make(n_experts=4, experts_per_token=2, moe_layers=(1,))
    t = toks(batch=3, pos=12)
    _, c = model.run_with_cache(t)
    assert (c["blocks.1.mlp.hook_expert_indices"] == 2).any()
    assert c["blocks.1.mlp.experts.2.hook_post"].shape[0] > 0
    keep = torch.tensor([True, True, False, True])
    model.set_expert_mask(1, keep)
    _, c2 = model.run_with_cache(t)
    assert not (c2["blocks.1.mlp.hook_expert_indices"] == 2).any()
    assert c2["blocks.1.mlp.experts.2.hook_post"].shape[0] == 0
    routed = sum(c2[f"blocks.1.mlp.experts.{e}.hook_post"].shape[0] for e in range(4))
    assert routed == t.numel() * 2  # every token still goes to top_k experts
    assert torch.allclose(c2["blocks.1.mlp.hook_expert_weights"].sum(-1), torch.ones(3, 12))
    model.set_expert_mask(1, None)
    assert close(model(t), model.run_with_cache(t)[0])
    assert close(
        model.run_with_cache(t)[1]["blocks.1.mlp.hook_expert_indices"].float(),
        c["blocks.1.mlp.hook_expert_indices"].float(),
        atol=0,
    )


def test_moe_losses_follow_switch_formula() -> None:
    """aux = coef * N * sum_i f_i P_i, averaged over MoE layers (Fedus et al. 2021, eq. 4)."""
    model = make(n_experts=4, experts_per_token=2, moe_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    t = toks()
    _, c = model.run_with_cache(t)
    aux, z = [], []
    for layer in range(2):
        logits = c[f"blocks.{layer}.mlp.hook_router_logits"].reshape(-1, 4)
        idx = c[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(-1, 2)
        f = F.one_hot(idx, 4).sum(1).float().mean(0) / 2
        P = torch.softmax(logits, -1).mean(0)
        aux.append(4 * (f * P).sum())
        z.append(torch.logsumexp(logits, -1).pow(2).mean())
    losses = model.moe_losses()
    assert torch.allclose(losses["aux"], 0.5 * torch.stack(aux).mean(), atol=1e-6)
    assert torch.allclose(losses["z"], 0.25 * torch.stack(z).mean(), atol=1e-5)


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
KERNEL_MASKS = {
    "causal": "causal",
    "bidirectional": "bidirectional",
    "prefix": "prefix_lm:4",
    "sliding_window": "causal&sliding_window:3",
    "block_sparse": "block_sparse:4",
    "strided": "causal&strided:3",
    "composed": (masks.causal() & masks.block_sparse(4)) | (masks.causal() & masks.strided(4)),
}


@pytest.mark.parametrize("mask", list(KERNEL_MASKS))
@pytest.mark.parametrize("positional", POSITIONALS)
def test_eager_equals_sdpa_equals_auto(mask: str, positional: str) -> None:
    t = toks(pos=11)
    pads = {
        "none": None,
        "left": torch.tensor([[0] * 3 + [1] * 8, [1] * 11]),
        "right": torch.tensor([[1] * 11, [1] * 7 + [0] * 4]),
    }
    extras = [dict(), dict(soft_mask_penalty=2.0, attn_temperature=0.7)]
    for pad_name, extra in itertools.product(pads, extras):
        am = pads[pad_name]
        outs = {}
        for kernel in ("eager", "sdpa", "auto"):
            model = make(
                positional=positional,
                mask=KERNEL_MASKS[mask],
                attn_kernel=kernel,
                n_kv_heads=2,
                **extra,
            )
            outs[kernel] = model(t, attention_mask=am)
        keep = torch.ones(t.shape, dtype=torch.bool) if am is None else am.bool()
        for kernel in ("sdpa", "auto"):
            a, b = outs["eager"][keep], outs[kernel][keep]
            assert close(a, b), (pad_name, extra, kernel, (a - b).abs().max().item())
            assert torch.isfinite(outs[kernel]).all()


def test_auto_runs_only_the_hooked_layer_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(n_layers=3)
    eager_layers: list[int] = []
    original = Attention._eager

    def spy(self, *a, **k):
        eager_layers.append(self.layer)
        return original(self, *a, **k)

    monkeypatch.setattr(Attention, "_eager", spy)
    t = toks()
    model(t)
    assert eager_layers == []
    _, cache = model.run_with_cache(t, names_filter="blocks.1.attn.hook_pattern")
    assert eager_layers == [1] and list(cache.keys()) == ["blocks.1.attn.hook_pattern"]
    eager_layers.clear()
    model.run_with_cache(
        t,
        names_filter=lambda n: n in ("blocks.2.attn.hook_attn_scores", "blocks.0.hook_resid_post"),
    )
    assert eager_layers == [2]
    eager_layers.clear()
    model.run_with_cache(t, names_filter=["blocks.0.attn.hook_z", "blocks.2.hook_attn_out"])
    assert eager_layers == []


# ------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------
CACHE_CONFIGS = {
    **{p: dict(positional=p) for p in POSITIONALS},
    "rope_partial_interleaved_gqa": dict(
        positional="rope", rotary_dim=2, rope_interleaved=True, n_kv_heads=2
    ),
    "mqa_alibi": dict(positional="alibi", n_kv_heads=1),
    "sliding_window": dict(positional="rope", mask="causal&sliding_window:3"),
    "linear": dict(attn_kernel="linear", positional="rope"),
    "moe": dict(n_experts=3, n_shared_experts=1, experts_per_token=2),
    "post_norm_temperature": dict(norm_placement="post", attn_temperature=0.8),
    "prefix_within_prompt": dict(mask="prefix_lm:3"),
}


@pytest.mark.parametrize(
    "kw",
    [
        dict(soft_mask_penalty=1.5),
        dict(mask="prefix_lm:8"),
        dict(mask="bidirectional"),
        dict(mask="block_sparse:4"),
    ],
    ids=str,
)
def test_generation_under_non_causal_masks_equals_full_recompute(kw: dict) -> None:
    """A soft penalty or a mask that sees later tokens makes a KV cache stale; generate must
    notice and give what recomputing every step gives."""
    model = make(**kw)
    prompt = toks(batch=4, pos=5)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=12),
        model.generate(prompt, max_new_tokens=12, use_cache=False),
    )
    plain = make()
    with plain.override_attention(
        **({"soft_mask_penalty": 1.5} if "soft_mask_penalty" in kw else {"mask": kw["mask"]})
    ):
        assert torch.equal(
            plain.generate(prompt, max_new_tokens=12),
            plain.generate(prompt, max_new_tokens=12, use_cache=False),
        )


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_generation_with_kv_cache_equals_full_recompute(name: str) -> None:
    model = make(**CACHE_CONFIGS[name])
    prompt = toks(batch=2, pos=5)
    with_cache = model.generate(prompt, max_new_tokens=7)
    without = model.generate(prompt, max_new_tokens=7, use_cache=False)
    assert torch.equal(with_cache, without)
    # per-step logits: feed the generated tokens one at a time through a KV cache
    full = model(with_cache)
    cache = KVCache(model.cfg.n_layers)
    steps = [model(with_cache[:, :5], past_kv=cache)]
    for i in range(5, with_cache.shape[1]):
        steps.append(model(with_cache[:, i : i + 1], past_kv=cache))
    assert close(torch.cat(steps, 1), full, atol=1e-4)


def test_generation_with_left_padding_and_cache_equals_recompute() -> None:
    model = make(positional="rope", n_kv_heads=2)
    prompt = toks(batch=2, pos=6)
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    a = model.generate(prompt, max_new_tokens=5, attention_mask=am)
    b = model.generate(prompt, max_new_tokens=5, attention_mask=am, use_cache=False)
    assert torch.equal(a, b)


def test_encoder_decoder_generation_with_cache_equals_recompute() -> None:
    model = make(architecture="encoder_decoder", positional="relative", n_decoder_layers=2)
    src = toks(batch=2, pos=7)
    out = model.generate(src, max_new_tokens=5)
    full = model(src, out)
    # greedy: each generated token is the argmax of the full recompute at the previous step
    assert torch.equal(full[:, :-1].argmax(-1), out[:, 1:])


def _greedy_recompute(model, src: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(src.shape[0], 1, dtype=torch.long)
    for _ in range(n):
        out = torch.cat([out, model(src, out)[:, -1].argmax(-1, keepdim=True)], 1)
    return out


def test_encoder_decoder_overrides_reach_the_decoder_and_generation_stays_exact() -> None:
    model = make(architecture="encoder_decoder", positional="relative")
    src, dec = toks(batch=3, pos=7), toks(batch=3, pos=6, seed=4)
    ref = model(src, dec)
    with model.override_attention(mask="bidirectional"):
        bidir = model(src, dec)
        assert torch.equal(model.generate(src, max_new_tokens=8), _greedy_recompute(model, src, 8))
    assert not close(bidir[:, :-1], ref[:, :-1], atol=1e-3)
    with model.override_attention(soft_mask_penalty=1.0):
        assert torch.equal(model.generate(src, max_new_tokens=8), _greedy_recompute(model, src, 8))
    assert torch.equal(model.generate(src, max_new_tokens=8), _greedy_recompute(model, src, 8))


# ------------------------------------------------------------------------------------------
# positions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotary_dim,interleaved", [(8, False), (8, True), (4, False), (4, True)])
def test_rope_scores_depend_only_on_relative_offset(rotary_dim: int, interleaved: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(i: int, j: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([i]), rotary_dim, 10000.0, interleaved, torch.float64)
        ck, sk = rope_cos_sin(torch.tensor([j]), rotary_dim, 10000.0, interleaved, torch.float64)
        return (
            apply_rope(q.double(), cq, sq, interleaved)
            * apply_rope(k.double(), ck, sk, interleaved)
        ).sum()

    for i, j, s in [(3, 1, 5), (7, 7, 100), (2, 9, 1000), (0, 4, 12345)]:
        # angles are computed in float32, as in HF: absolute error grows with the position
        assert torch.allclose(score(i, j), score(i + s, j + s), atol=1e-4)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    # rotation keeps norms; the pass-through dims are untouched
    cq, sq = rope_cos_sin(torch.tensor([5]), rotary_dim, 10000.0, interleaved, torch.float64)
    r = apply_rope(q.double(), cq, sq, interleaved)
    assert torch.allclose(r.norm(), q.double().norm())
    assert torch.equal(r[..., rotary_dim:], q.double()[..., rotary_dim:])


@pytest.mark.parametrize("rotary_dim", [None, 2])
def test_rope_model_scores_are_shift_invariant(rotary_dim: int | None) -> None:
    """Layer 0's scores among the same tokens at positions 0.. and s.. are equal (KV-cache
    offset)."""
    model = make(
        n_layers=1, positional="rope", rotary_dim=rotary_dim, attn_kernel="eager", n_kv_heads=2
    )
    t = toks(batch=1, pos=6)
    _, c = model.run_with_cache(t, names_filter="blocks.0.attn.hook_attn_scores")
    ref = c["blocks.0.attn.hook_attn_scores"]
    s = 9
    cache = KVCache(1)
    model(toks(batch=1, pos=s, seed=5), past_kv=cache)
    _, c2 = model.run_with_cache(t, past_kv=cache, names_filter="blocks.0.attn.hook_attn_scores")
    shifted = c2["blocks.0.attn.hook_attn_scores"][..., s:]
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    assert close(shifted[..., allowed], ref[..., allowed], atol=1e-4)


def test_alibi_slopes_are_press_et_al() -> None:
    from interp.positions import alibi_slopes

    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** -(2 * (i + 1)) for i in range(4)]))
    # non-power of two: the 4 slopes of n=4, then every other slope of n=8
    assert torch.allclose(alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


# ------------------------------------------------------------------------------------------
# soft masks and temperature
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("mask", ["causal", "causal&sliding_window:3", "block_sparse:4"])
def test_soft_penalty_converges_to_hard_mask(kernel: str, mask: str) -> None:
    model = make(attn_kernel=kernel, mask=mask, positional="rope")
    t = toks(pos=12)
    hard = torch.log_softmax(model(t), -1)
    kls = []
    for penalty in (1.0, 4.0, 16.0, 64.0, 1e4):
        with model.override_attention(soft_mask_penalty=penalty):
            soft = torch.log_softmax(model(t), -1)
        kls.append(F.kl_div(soft, hard, log_target=True, reduction="batchmean").item())
    # strictly falling until it reaches float32 rounding, then stays there
    assert all(b < a or max(a, b) < 1e-6 for a, b in zip(kls, kls[1:], strict=False)), kls
    assert abs(kls[-1]) < 1e-6 and kls[0] > 1e-2 and kls[1] > 1e-4, kls
    # a zero penalty is no mask at all
    with model.override_attention(soft_mask_penalty=0.0):
        zero = model(t)
    with model.override_attention(mask="bidirectional"):
        assert close(zero, model(t))


def test_temperature_one_is_default_and_temperature_scales_scores() -> None:
    model = make(n_kv_heads=2, positional="rope")
    t = toks()
    ref = model(t)
    with model.override_attention(temperature=1.0):
        assert close(model(t), ref, atol=0)
    cfg1 = ModelConfig(**BASE, n_kv_heads=2, positional="rope", attn_temperature=1.0)
    m1 = build_model(cfg1).eval()
    m1.load_state_dict(model.state_dict())
    assert close(m1(t), ref, atol=0)
    # temperature T equals an attention scale divided by T
    scaled = build_model(
        ModelConfig(**BASE, n_kv_heads=2, positional="rope", attn_scale=0.25**0.5 / 2.5)
    ).eval()
    scaled.load_state_dict(model.state_dict())
    for kernel_model in (model,):
        with kernel_model.override_attention(temperature=2.5):
            assert close(kernel_model(t), scaled(t))
    assert not close(scaled(t), ref, atol=1e-3)
    # a high temperature flattens every pattern towards uniform over the visible keys
    with model.override_attention(temperature=1e6):
        _, c = model.run_with_cache(t, names_filter="blocks.0.attn.hook_pattern")
    p = c["pattern", 0]
    expected = torch.ones(12, 12).tril() / torch.arange(1, 13)[:, None]
    assert close(p, expected.expand_as(p), atol=1e-4)
