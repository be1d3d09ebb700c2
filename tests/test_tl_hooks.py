"""TransformerLens' opt-in hook points are real (issue 19).

``hook_tokens``, ``hook_attn_in``, ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` and
``hook_mlp_in`` sit behind TL's flags (``cfg.use_*``, ``model.set_use_*``), off by default.
When on, editing them changes the output exactly as the math says: head h's input copy
reaches only head h's q (KV head j's only its k or v), ablating a head through
``hook_result`` equals ablating it through ``hook_z``, and identity edits leave the logits
bit-equal. Checked on the variants they touch: MHA, GQA/MQA with RoPE, parallel
attention+MLP, post-norm, MoE, linear attention with per-head q/k norms, and the
encoder-decoder (both stacks' self-attention; cross-attention keeps its fused path).
"""

from __future__ import annotations

import pytest
import torch

from interp import InterpError, ModelConfig, build_model

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=40, n_ctx=16)
VARIANTS = {
    "mha": dict(),
    "gqa_rope": dict(n_kv_heads=2, positional="rope", norm="rmsnorm", act="swiglu"),
    "mqa": dict(n_kv_heads=1, positional="rope"),
    "parallel": dict(parallel_attn_mlp=True),
    "post_norm": dict(norm_placement="post"),
    "moe": dict(n_experts=3, experts_per_token=2, norm="rmsnorm"),
    "encoder_decoder": dict(architecture="encoder_decoder", n_decoder_layers=2),
    "linear_attention": dict(attn_kernel="linear", positional="rope", qk_norm="head"),
}
SETTERS = {
    "use_split_qkv_input": "set_use_split_qkv_input",
    "use_attn_in": "set_use_attn_in",
    "use_hook_mlp_in": "set_use_hook_mlp_in",
    "use_attn_result": "set_use_attn_result",
    "use_hook_tokens": "set_use_hook_tokens",
}
OPT_IN = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in")


def make(kw: dict):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **kw})).eval()
    # random norm weights and biases, so that the norm of each copy matters
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


TOKENS = torch.randint(0, BASE["d_vocab"], (2, 6), generator=torch.Generator().manual_seed(1))


def run(model, **kw):
    if model.cfg.architecture == "encoder_decoder":
        return model.run_with_hooks(TOKENS, TOKENS[:, :4], **kw)
    return model.run_with_hooks(TOKENS, **kw)


def cache_of(model, **kw):
    if model.cfg.architecture == "encoder_decoder":
        return model.run_with_cache(TOKENS, TOKENS[:, :4], **kw)
    return model.run_with_cache(TOKENS, **kw)


def stack(model) -> str:
    return "decoder" if model.cfg.architecture == "encoder_decoder" else "blocks"


def all_on(model) -> None:
    for setter in SETTERS.values():
        getattr(model, setter)(True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flags_on_keep_the_logits(name: str) -> None:
    """Every flag on computes the same function (per-head einsums instead of fused matmuls)."""
    model = make(VARIANTS[name])
    base = run(model)
    all_on(model)
    torch.testing.assert_close(run(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_identity_edits_are_bit_equal(name: str) -> None:
    model = make(VARIANTS[name])
    all_on(model)
    plain = run(model)
    names = [n for n in model.hook_dict if n.rsplit(".", 1)[-1] in OPT_IN]
    names += [n for n in model.hook_dict if n.endswith(("attn.hook_result", "hook_tokens"))]
    assert len(names) >= 5 * model.cfg.n_layers
    hooked = run(model, fwd_hooks=[(n, lambda x, hook: x.clone()) for n in names])
    assert torch.equal(hooked, plain)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_has_opt_in_hooks_only_when_on(name: str) -> None:
    model = make(VARIANTS[name])
    _, cache = cache_of(model)
    assert not [n for n in cache.keys() if n.rsplit(".", 1)[-1] in OPT_IN + ("hook_tokens",)]
    assert not [n for n in cache.keys() if n.endswith("hook_result")]
    all_on(model)
    _, cache = cache_of(model)
    cfg, s = model.cfg, stack(model)
    B, T = TOKENS.shape[0], (4 if s == "decoder" else TOKENS.shape[1])
    assert cache[f"{s}.0.hook_q_input"].shape == (B, T, cfg.n_heads, cfg.d_model)
    assert cache[f"{s}.0.hook_attn_in"].shape == (B, T, cfg.n_heads, cfg.d_model)
    assert cache[f"{s}.1.hook_k_input"].shape == (B, T, cfg.n_kv_heads, cfg.d_model)
    assert cache[f"{s}.1.hook_v_input"].shape == (B, T, cfg.n_kv_heads, cfg.d_model)
    assert cache[f"{s}.1.hook_mlp_in"].shape == (B, T, cfg.d_model)
    assert cache[f"{s}.1.attn.hook_result"].shape == (B, T, cfg.n_heads, cfg.d_model)
    assert torch.equal(cache["hook_tokens"], TOKENS)


@pytest.mark.parametrize("name", ["mha", "gqa_rope", "post_norm", "parallel"])
def test_q_input_edit_changes_only_that_heads_q(name: str) -> None:
    model = make(VARIANTS[name])
    model.set_use_split_qkv_input(True)
    _, clean = model.run_with_cache(TOKENS)
    h = 2

    def edit(x, hook):
        x = x.clone()
        x[:, :, h] += torch.randn_like(x[:, :, h])
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", edit)]):
        _, edited = model.run_with_cache(TOKENS)
    q0, q1 = clean["blocks.1.attn.hook_q"], edited["blocks.1.attn.hook_q"]
    others = [i for i in range(model.cfg.n_heads) if i != h]
    assert torch.equal(q0[:, :, others], q1[:, :, others])
    assert not torch.allclose(q0[:, :, h], q1[:, :, h])
    for kv in ("hook_k", "hook_v"):
        assert torch.equal(clean[f"blocks.1.attn.{kv}"], edited[f"blocks.1.attn.{kv}"])


@pytest.mark.parametrize("part", ["k", "v"])
def test_kv_input_is_per_kv_head_with_gqa(part: str) -> None:
    """With GQA, hook_k_input / hook_v_input hold one copy per KV head (as TL)."""
    model = make(VARIANTS["gqa_rope"])
    model.set_use_split_qkv_input(True)
    _, clean = model.run_with_cache(TOKENS)
    j = 1

    def edit(x, hook):
        assert x.shape[2] == model.cfg.n_kv_heads
        x = x.clone()
        x[:, :, j] *= -2.0
        return x

    with model.hooks(fwd_hooks=[(f"blocks.0.hook_{part}_input", edit)]):
        _, edited = model.run_with_cache(TOKENS)
    a, b = clean[f"blocks.0.attn.hook_{part}"], edited[f"blocks.0.attn.hook_{part}"]
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and not torch.allclose(a[:, :, j], b[:, :, j])
    other = "v" if part == "k" else "k"
    assert torch.equal(clean[f"blocks.0.attn.hook_{other}"], edited[f"blocks.0.attn.hook_{other}"])
    assert torch.equal(clean["blocks.0.attn.hook_q"], edited["blocks.0.attn.hook_q"])


def test_q_input_follows_tl_math() -> None:
    """hook_q = ln1(q_input[:, :, h]) @ W_Q[h] + b_Q[h]: the norm applies to each copy."""
    model = make(VARIANTS["mha"])
    model.set_use_split_qkv_input(True)
    new = torch.randn(2, 6, 4, 32)
    with model.hooks(fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: new)]):
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_q")
    attn, ln1 = model.blocks[0].attn, model.blocks[0].ln1
    with torch.no_grad():
        want = torch.einsum("bphm,hmd->bphd", ln1(new), attn.W_Q) + attn.b_Q
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], want, atol=1e-5, rtol=1e-5)


def test_attn_in_edit_reaches_q_k_v_of_that_head_only() -> None:
    model = make(VARIANTS["mha"])
    model.set_use_attn_in(True)
    _, clean = model.run_with_cache(TOKENS)

    def edit(x, hook):
        x = x.clone()
        x[:, :, 3] = 0.5
        return x

    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_in", edit)]):
        _, edited = model.run_with_cache(TOKENS)
    for part in "qkv":
        a, b = clean[f"blocks.0.attn.hook_{part}"], edited[f"blocks.0.attn.hook_{part}"]
        assert torch.equal(a[:, :, :3], b[:, :, :3]) and not torch.allclose(a[:, :, 3], b[:, :, 3])


def test_attn_in_with_gqa_feeds_kv_from_the_groups_first_head() -> None:
    model = make(VARIANTS["gqa_rope"])  # 4 query heads, 2 KV heads: groups {0, 1}, {2, 3}
    model.set_use_attn_in(True)
    _, clean = model.run_with_cache(TOKENS)
    for head, kv_changes in ((1, False), (2, True)):
        def edit(x, hook, head=head):
            x = x.clone()
            x[:, :, head] = 1.0
            return x

        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_in", edit)]):
            _, edited = model.run_with_cache(TOKENS)
        k0, k1 = clean["blocks.0.attn.hook_k"], edited["blocks.0.attn.hook_k"]
        assert torch.equal(k0[:, :, 0], k1[:, :, 0])
        assert torch.equal(k0[:, :, 1], k1[:, :, 1]) != kv_changes


@pytest.mark.parametrize("name", ["mha", "gqa_rope", "moe", "encoder_decoder"])
def test_result_ablation_equals_z_ablation(name: str) -> None:
    model = make(VARIANTS[name])
    model.set_use_attn_result(True)
    s, h = stack(model), 1

    def zero(x, hook):
        x = x.clone()
        x[:, :, h] = 0.0
        return x

    via_z = run(model, fwd_hooks=[(f"{s}.1.attn.hook_z", zero)])
    via_result = run(model, fwd_hooks=[(f"{s}.1.attn.hook_result", zero)])
    torch.testing.assert_close(via_result, via_z, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(via_z, run(model), atol=1e-4)


@pytest.mark.parametrize("name", ["mha", "parallel", "post_norm", "moe"])
def test_mlp_in_edit_reaches_the_mlp_not_the_residual(name: str) -> None:
    model = make(VARIANTS[name])
    model.set_use_hook_mlp_in(True)
    _, clean = model.run_with_cache(TOKENS)

    def scale_in_place(x, hook):
        x.mul_(0.5)  # in place: must not leak into the residual stream
        return x

    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", scale_in_place)]):
        _, edited = model.run_with_cache(TOKENS)
    blk, cfg = model.blocks[0], model.cfg
    resid = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
    assert torch.equal(clean[f"blocks.0.{resid}"], edited[f"blocks.0.{resid}"])
    mlp_in = clean[f"blocks.0.{resid}"] * 0.5
    with torch.no_grad():
        x = mlp_in if cfg.norm_placement == "post" else blk.ln2(mlp_in)
        want = blk.mlp(x) if name != "moe" else blk.mlp(x, None)
    torch.testing.assert_close(edited["blocks.0.hook_mlp_out"], want, atol=1e-5, rtol=1e-5)


def test_hook_tokens_edit_equals_running_the_edited_tokens() -> None:
    model = make(VARIANTS["mha"])
    model.set_use_hook_tokens(True)
    other = (TOKENS + 1) % BASE["d_vocab"]
    edited = model.run_with_hooks(TOKENS, fwd_hooks=[("hook_tokens", lambda t, hook: other)])
    assert torch.equal(edited, model(other))


def test_registered_hook_fires_with_the_flag_off() -> None:
    """interp never skips a registered hook: TL would ignore it while the flag is off."""
    model = make(VARIANTS["mha"])
    seen = []
    model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: seen.append(
        x.shape))])
    assert seen == [(2, 6, 4, 32)] and not model.cfg.use_split_qkv_input


def test_setters_update_the_shared_config() -> None:
    model = make(VARIANTS["mha"])
    for field, setter in SETTERS.items():
        assert getattr(model.cfg, field) is False
        getattr(model, setter)(True)
        assert getattr(model.cfg, field) is True
        assert all(b.cfg is model.cfg for b in model.blocks)
    assert model.use_attn_result and model.blocks[0].attn.use_attn_result
    model.set_use_attn_result(False)
    assert not model.use_attn_result and not model.cfg.use_attn_result
    with pytest.raises(InterpError, match="set_use_attn_in takes True or False"):
        model.set_use_attn_in("yes")


def test_flags_in_the_config_build_the_model_with_them_on() -> None:
    model = make(dict(use_split_qkv_input=True, use_attn_result=True))
    _, cache = model.run_with_cache(TOKENS)
    assert "blocks.0.hook_q_input" in cache.keys() and "blocks.0.attn.hook_result" in cache.keys()
    with pytest.raises(ValueError, match="use_hook_mlp_in must be True or False"):
        ModelConfig(**BASE, use_hook_mlp_in=1)


def test_split_input_with_kv_cache_equals_the_full_forward() -> None:
    from interp.model import KVCache

    model = make(VARIANTS["gqa_rope"])
    model.set_use_split_qkv_input(True)
    full = model(TOKENS)
    cache = KVCache(model.cfg.n_layers)
    first = model(TOKENS[:, :4], past_kv=cache)
    last = model(TOKENS[:, 4:], past_kv=cache)
    torch.testing.assert_close(torch.cat([first, last], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_in_place_edits_of_q_k_v_work_under_autograd(part: str) -> None:
    """TL's Main Demo ablates a head by writing into hook_v in place, gradients on."""
    model = make(VARIANTS["gqa_rope"])

    def ablate(x, hook):
        x[:, :, 1, :] = 0.0
        return x

    def clone_ablate(x, hook):
        return ablate(x.clone(), hook)

    name = f"blocks.0.attn.hook_{part}"
    loss = model.run_with_hooks(TOKENS, return_type="loss", fwd_hooks=[(name, ablate)])
    loss.backward()
    want = model.run_with_hooks(TOKENS, return_type="loss", fwd_hooks=[(name, clone_ablate)])
    torch.testing.assert_close(loss, want)
