"""Hook names, hook mechanics and TransformerLens ActivationCache helpers.

The ordered hook names of each representative model are saved in ``tests/golden/*.txt``;
regenerate them with ``pytest tests/test_core_hooks.py --update-golden`` and review the diff
(every name must also match DESIGN.md's list, checked by ``test_golden_names_follow_design``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from interp import HookNameError, InterpError, ModelConfig, build_model
from interp.hooks import opt_in_off

GOLDEN = Path(__file__).parent / "golden"
BASE = dict(n_layers=2, d_model=16, n_heads=4, d_vocab=23, n_ctx=16)

REPRESENTATIVE = {
    "dense_decoder": dict(),
    "gqa_rope_rmsnorm_swiglu": dict(
        n_kv_heads=2,
        positional="rope",
        rotary_dim=2,
        norm="rmsnorm",
        act="swiglu",
        attn_qkv_bias=False,
        mlp_bias=False,
    ),
    "bert_encoder": dict(
        architecture="encoder",
        norm_placement="post",
        embed_norm=True,
        n_token_types=2,
        final_norm=False,
        act="gelu",
    ),
    "moe": dict(
        n_experts=3,
        experts_per_token=2,
        moe_layers=(1,),
        n_shared_experts=1,
        shared_expert_gate=True,
        act="swiglu",
        norm="rmsnorm",
        positional="rope",
    ),
    "encoder_decoder": dict(
        architecture="encoder_decoder", n_decoder_layers=1, positional="relative", norm="rmsnorm"
    ),
    "linear_attention": dict(attn_kernel="linear", positional="rope"),
}


def make(kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**BASE, **kw})).eval()


def tokens(batch: int = 2, pos: int = 7) -> torch.Tensor:
    return torch.randint(
        0, BASE["d_vocab"], (batch, pos), generator=torch.Generator().manual_seed(3)
    )


def run_cache(model, t: torch.Tensor, **kw):
    if model.cfg.architecture == "encoder_decoder":
        return model.run_with_cache(t, t[:, :4], **kw)
    return model.run_with_cache(t, **kw)


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_cache_holds_exactly_the_golden_hook_names(name: str, update_golden: bool) -> None:
    model = make(REPRESENTATIVE[name])
    _, cache = run_cache(model, tokens())
    names = list(cache.keys())  # the order the hooks fired in the forward pass
    path = GOLDEN / f"{name}.txt"
    if update_golden:
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(names) + "\n")
    expected = path.read_text().split()
    assert names == expected, (
        f"hook names changed; rerun with --update-golden and review the diff of {path}"
    )
    # every declared hook point fires except TransformerLens' opt-in ones (flags off)
    declared = set(model.hook_dict)
    assert declared - set(names) == {n for n in declared if opt_in_off(n, {})}


# DESIGN.md's hook-name list, plus the documented extras (token types, embedding norm, the
# encoder-decoder's decoder embedding and cross-attention sub-block, linear-attention feature
# maps, shared experts)
_L = r"(blocks|encoder|decoder)\.\d+"
DESIGN_PATTERNS = [
    r"hook_embed",
    r"hook_pos_embed",
    r"hook_token_type_embed",
    r"hook_decoder_embed",
    r"hook_decoder_pos_embed",
    r"(ln_embed|ln_final|encoder_final_ln)\.hook_(scale|normalized)",
    rf"{_L}\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|cross_attn_out|resid_mid_cross)",
    rf"{_L}\.hook_(attn_in|q_input|k_input|v_input|mlp_in)",
    r"hook_tokens",
    rf"{_L}\.(ln1|ln2|ln_cross)\.hook_(scale|normalized)",
    rf"{_L}\.(attn|cross_attn)\.hook_(q|k|v|attn_scores|pattern|z|result)",
    rf"{_L}\.attn\.hook_(rot_q|rot_k|q_feat|k_feat)",
    rf"{_L}\.mlp\.hook_(pre|pre_linear|post|router_logits|expert_weights|expert_indices)",
    rf"{_L}\.mlp\.(experts\.\d+|shared)\.hook_(pre|pre_linear|post)",
]


@pytest.mark.parametrize("name", list(REPRESENTATIVE))
def test_golden_names_follow_design(name: str) -> None:
    names = (GOLDEN / f"{name}.txt").read_text().split()
    bad = [n for n in names if not any(re.fullmatch(p, n) for p in DESIGN_PATTERNS)]
    assert not bad, bad
    cfg = ModelConfig(**{**BASE, **REPRESENTATIVE[name]})
    # the per-layer TransformerLens order: resid_pre, (ln1), q k v, (rot), scores, pattern, z,
    # attn_out, ...
    stack = "decoder" if cfg.architecture == "encoder_decoder" else "blocks"
    layer = [n.split(".", 2)[2] for n in names if n.startswith(f"{stack}.0.")]
    assert layer[0] == "hook_resid_pre" and layer[-1] == "hook_resid_post"
    order = [
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_z",
        "hook_attn_out",
    ]
    assert [n for n in layer if n in order] == order
    if cfg.positional == "rope":
        assert layer.index("attn.hook_rot_q") == layer.index("attn.hook_v") + 1
    if cfg.architecture == "encoder_decoder":
        assert (
            "decoder.0.cross_attn.hook_pattern" in names and "encoder.1.attn.hook_pattern" in names
        )
        assert not any(n.startswith("blocks.") for n in names)


def test_hook_result_is_opt_in() -> None:
    model = make({})
    t = tokens()
    _, cache = model.run_with_cache(t)
    assert "blocks.0.attn.hook_result" not in cache.keys()
    model.set_use_attn_result(True)
    logits, cache = model.run_with_cache(t)
    model.set_use_attn_result(False)
    result = cache["blocks.1.attn.hook_result"]
    assert result.shape == (2, 7, 4, BASE["d_model"])
    assert torch.allclose(
        result.sum(2) + model.blocks[1].attn.b_O, cache["blocks.1.hook_attn_out"], atol=1e-6
    )
    assert torch.allclose(logits, model(t), atol=1e-5)


def test_hook_shapes_follow_transformer_lens() -> None:
    cfg = dict(
        n_kv_heads=2,
        positional="rope",
        n_experts=3,
        experts_per_token=2,
        moe_layers=(1,),
        act="swiglu",
    )
    model = make(cfg)
    _, c = model.run_with_cache(tokens())
    B, P, D, H, KV, Dh, M = 2, 7, 16, 4, 2, 4, 64
    shapes = {
        "hook_embed": (B, P, D),
        "hook_pos_embed": (B, P, D) if "hook_pos_embed" in c.keys() else None,
        "blocks.0.hook_resid_pre": (B, P, D),
        "blocks.0.ln1.hook_scale": (B, P, 1),
        "blocks.0.ln1.hook_normalized": (B, P, D),
        "blocks.0.attn.hook_q": (B, P, H, Dh),
        "blocks.0.attn.hook_k": (B, P, KV, Dh),
        "blocks.0.attn.hook_v": (B, P, KV, Dh),
        "blocks.0.attn.hook_rot_q": (B, P, H, Dh),
        "blocks.0.attn.hook_rot_k": (B, P, KV, Dh),
        "blocks.0.attn.hook_attn_scores": (B, H, P, P),
        "blocks.0.attn.hook_pattern": (B, H, P, P),
        "blocks.0.attn.hook_z": (B, P, H, Dh),
        "blocks.0.hook_attn_out": (B, P, D),
        "blocks.0.hook_resid_mid": (B, P, D),
        "blocks.0.mlp.hook_pre": (B, P, M),
        "blocks.0.mlp.hook_pre_linear": (B, P, M),
        "blocks.0.mlp.hook_post": (B, P, M),
        "blocks.0.hook_mlp_out": (B, P, D),
        "blocks.0.hook_resid_post": (B, P, D),
        "blocks.1.mlp.hook_router_logits": (B, P, 3),
        "blocks.1.mlp.hook_expert_weights": (B, P, 2),
        "blocks.1.mlp.hook_expert_indices": (B, P, 2),
        "ln_final.hook_normalized": (B, P, D),
    }
    for name, shape in shapes.items():
        if shape is not None:
            assert tuple(c[name].shape) == shape, name
    routed = [c[f"blocks.1.mlp.experts.{e}.hook_post"].shape for e in range(3)]
    assert all(s[1] == M for s in routed) and sum(s[0] for s in routed) == B * P * 2
    # the pattern is a distribution over visible keys
    p = c["pattern", 0]
    assert torch.allclose(p.sum(-1), torch.ones(B, H, P)) and bool((p.triu(1) == 0).all())


# ------------------------------------------------------------------------------------------
# hook mechanics
# ------------------------------------------------------------------------------------------
def test_unknown_hook_names_raise_with_closest_names() -> None:
    model = make({})
    t = tokens()
    with pytest.raises(HookNameError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.hook_dict["blocks.0.attn.hook_patern"]
    with pytest.raises(HookNameError, match=r"Closest real names: blocks\.1\.hook_resid_post"):
        model.run_with_hooks(t, fwd_hooks=[("blocks.1.hook_resid_pots", lambda x, hook: x)])
    with pytest.raises(HookNameError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_cache(t, names_filter="blocks.0.attn.hook_patern")
    with pytest.raises(HookNameError, match=r"hook_z"):
        model.run_with_cache(t, names_filter=["blocks.0.attn.hook_z", "blocks.0.attn.hook_zz"])
    with pytest.raises(HookNameError):
        model.add_hook("nonsense", lambda x, hook: x)
    err = HookNameError("x")
    assert (
        isinstance(err, InterpError) and isinstance(err, ValueError) and isinstance(err, KeyError)
    )
    # a failed call leaves no hook behind
    assert not any(h._forward_hooks for h in model.hook_dict.values())
    with pytest.raises(HookNameError):
        model.check_hook_names(["hook_embed", "blocks.9.hook_resid_pre"])


def test_backward_hooks_fire() -> None:
    model = make(dict(n_kv_heads=2, positional="rope"))
    t = tokens()
    loss, cache = model.run_with_cache(t, return_type="loss", incl_bwd=True)
    assert (
        "blocks.1.hook_resid_post_grad" in cache.keys()
        and "blocks.0.attn.hook_pattern_grad" in cache.keys()
    )
    assert (
        cache["blocks.0.attn.hook_pattern_grad"].shape == cache["blocks.0.attn.hook_pattern"].shape
    )
    model.zero_grad()
    # add_hook(dir="bwd"): the gradient equals autograd's gradient w.r.t. the hooked activation
    seen = {}
    kept = {}

    def bwd(grad, hook):
        seen[hook.name] = grad.detach().clone()

    def keep(x, hook):
        x.retain_grad()
        kept["x"] = x
        return x

    model.add_hook("blocks.0.hook_attn_out", bwd, dir="bwd")
    model.add_hook("blocks.0.hook_attn_out", keep, dir="fwd")
    model(t, return_type="loss").backward()
    model.reset_hooks()
    assert torch.allclose(seen["blocks.0.hook_attn_out"], kept["x"].grad)
    model(t, return_type="loss").backward()  # hooks removed: nothing more recorded
    assert list(seen) == ["blocks.0.hook_attn_out"]
    assert not any(h._backward_hooks or h._forward_hooks for h in model.hook_dict.values())


def test_run_with_hooks_patches_and_resets() -> None:
    model = make({})
    t = tokens()
    ref = model(t)

    def zero_head(z, hook):
        z[:, :, 1] = 0.0
        return z

    patched = model.run_with_hooks(t, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    assert not torch.allclose(patched, ref, atol=1e-4)
    assert torch.equal(model(t), ref)  # hooks are removed after the call
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_head)]):
        assert torch.allclose(model(t), patched)


def test_hook_contexts_remove_only_their_own_hooks() -> None:
    """interp's remove_all_hook_fns visits only hook points holding hooks (a speed-up); the
    semantics stay TransformerLens': a context's exit removes its level's hooks, nested
    contexts keep the outer ones, permanent hooks survive, backward hooks go too."""
    model = make({})
    calls: list[str] = []

    def note(tag: str):
        def hook(act, hook):
            calls.append(tag)
        return hook

    def hooked(hp) -> int:
        return len(model.hook_dict[hp].fwd_hooks) + len(model.hook_dict[hp].bwd_hooks)

    model.add_perma_hook("hook_embed", note("perma"))
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", note("outer"))],
                     bwd_hooks=[("blocks.0.hook_resid_post", note("bwd"))]):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", note("inner")),
                                    ("blocks.1.hook_resid_pre", note("inner1"))]):
            model(tokens())
            assert calls == ["perma", "outer", "inner", "inner1"]
        assert hooked("blocks.1.hook_resid_pre") == 0
        assert hooked("blocks.0.hook_resid_pre") == 1  # the outer context's hook is kept
        assert hooked("blocks.0.hook_resid_post") == 1
    assert hooked("blocks.0.hook_resid_pre") == hooked("blocks.0.hook_resid_post") == 0
    calls.clear()
    model(tokens())
    assert calls == ["perma"]  # permanent hooks survive every context
    model.reset_hooks(including_permanent=True)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    with pytest.raises(ValueError, match="direction"):
        model.remove_all_hook_fns("sideways")


# ------------------------------------------------------------------------------------------
# TransformerLens ActivationCache helpers
# ------------------------------------------------------------------------------------------
HELPER_CONFIGS = {
    "dense": dict(),
    "gqa_rope_rmsnorm_swiglu": REPRESENTATIVE["gqa_rope_rmsnorm_swiglu"],
    "parallel": dict(parallel_attn_mlp=True, positional="rope"),
    "attn_only": dict(attn_only=True),
    "norm_none": dict(norm="none"),
    "moe": REPRESENTATIVE["moe"],
}


@pytest.mark.parametrize("name", list(HELPER_CONFIGS))
def test_activation_cache_helpers(name: str) -> None:
    model = make(HELPER_CONFIGS[name])
    with (
        torch.no_grad()
    ):  # random non-trivial weights, but an identity ln_final so logits = resid @ W_U
        for n, p in model.named_parameters():
            if not n.startswith("ln_final"):
                p.add_(0.2 * torch.randn_like(p))
    cfg = model.cfg
    t = tokens()
    logits, cache = model.run_with_cache(t)
    L, final = cfg.n_layers, cache[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["resid_post", 0], cache["blocks.0.hook_resid_post"])
    # decompose_resid: embed (+ pos_embed) + every attn_out and mlp_out sums to the final residual
    parts, labels = cache.decompose_resid(return_labels=True)
    n_mlp = 0 if cfg.attn_only else L
    assert len(labels) == 1 + ("hook_pos_embed" in cache.keys()) + L + n_mlp
    assert torch.allclose(parts.sum(0), final, atol=1e-5)
    # accumulated_resid(apply_ln=True): the last entry is the final residual through ln_final
    acc = cache.accumulated_resid(apply_ln=True)
    assert acc.shape == (L + 1, 2, 7, cfg.d_model)
    if cfg.norm != "none":
        assert torch.allclose(acc[-1], cache["ln_final.hook_normalized"], atol=1e-5)
    # stack_head_results: per-head outputs plus the output bias give hook_attn_out
    heads, head_labels = cache.stack_head_results(return_labels=True)
    assert (
        heads.shape == (L * cfg.n_heads, 2, 7, cfg.d_model)
        and head_labels[-1] == f"L{L - 1}H{cfg.n_heads - 1}"
    )
    for layer in range(L):
        per_layer = (
            heads[layer * cfg.n_heads : (layer + 1) * cfg.n_heads].sum(0)
            + model.blocks[layer].attn.b_O
        )
        assert torch.allclose(per_layer, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5)
    # logit_attrs: direct logit attribution of every component sums to the logit
    target = t[:, -1]
    attrs = cache.logit_attrs(cache.decompose_resid(), tokens=target)  # applies ln_final itself
    expected = logits[torch.arange(2)[:, None], torch.arange(7)[None], target[:, None]]
    assert torch.allclose(attrs.sum(0), expected, atol=1e-4)
    # the full decomposition (heads, neurons, embeddings, biases) also sums to the final residual
    full = cache.get_full_resid_decomposition(expand_neurons=not cfg.is_moe)
    assert torch.allclose(full.sum(0), final, atol=1e-4)


def test_stop_and_start_at_layer() -> None:
    model = make({})
    t = tokens()
    _, cache = model.run_with_cache(t)
    for stop, layer in ((1, 1), (-1, 1), (0, 0), (-2, 0)):
        assert torch.allclose(
            model(t, stop_at_layer=stop), cache[f"blocks.{layer}.hook_resid_pre"], atol=1e-5
        )
    assert torch.allclose(model(t, stop_at_layer=2), cache["blocks.1.hook_resid_post"], atol=1e-5)
    for start in (1, -1):
        assert torch.allclose(
            model(t, start_at_layer=start, residual=cache["blocks.1.hook_resid_pre"]),
            model(t),
            atol=1e-5,
        )
    with pytest.raises(InterpError, match="stop_at_layer must be an integer in -2..2"):
        model(t, stop_at_layer=3)


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_encoder_decoder_absolute_positions_are_hooked(positional: str) -> None:
    model = make(dict(architecture="encoder_decoder", positional=positional))
    t = tokens()
    _, cache = model.run_with_cache(t, t[:, :4])
    assert cache["hook_pos_embed"].shape == (2, 7, 16) and cache[
        "hook_decoder_pos_embed"
    ].shape == (2, 4, 16)
    assert torch.allclose(cache["hook_decoder_pos_embed"][0], model.pos_embed.W_pos[:4])
    zeroed = model.run_with_hooks(
        t, t[:, :4], fwd_hooks=[("hook_decoder_pos_embed", lambda x, hook: x * 0)]
    )
    assert not torch.allclose(zeroed, model(t, t[:, :4]), atol=1e-4)
