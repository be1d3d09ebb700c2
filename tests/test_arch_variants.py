"""The per-layer attention core and the 2026 variants (issue 20), on random models.

Validation (one sentence per bad field), serialisation, and what each variant does to the
forward pass, checked against an independent computation: a sliding layer's pattern is full
size with keys at q - k >= window exactly zero; soft-caps are ``cap * tanh(x / cap)`` between
their two hooks; sandwich and post-branch norms sit inside the residual branch; each RoPE
scaling changes the frequencies its formula says; the KV cache past the window equals
recomputation; SDPA equals eager with sliding layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import interp
from interp.config import ModelConfig
from interp.positions import rope_cos_sin
from interp.rope_scaling import RopeScaling

torch.set_num_threads(1)
BASE = dict(n_layers=3, d_model=32, n_heads=4, d_vocab=50, n_ctx=64, positional="rope",
            norm="rmsnorm")
GEMMA_LIKE = dict(BASE, layer_types=("sliding", "sliding", "global"), sliding_window=3,
                  rope_local_base=1e4, rope_base=1e6, norm_placement="sandwich",
                  qk_norm="head", attn_softcap=5.0, final_softcap=4.0, embed_scale=32**0.5)


def _model(**kw: object) -> interp.HookedTransformer:
    torch.manual_seed(0)
    model = interp.HookedTransformer(ModelConfig(**{**BASE, **kw}))
    with torch.no_grad():  # unit-scale weights so caps and windows visibly matter
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, p.shape[-1] ** -0.5 * 3)
    return model.eval()


@pytest.mark.parametrize(("kw", "words"), [
    (dict(layer_types=("global",)), ["layer_types", "3"]),
    (dict(layer_types=("global", "local", "global")), ["'local'", "global, sliding"]),
    (dict(layer_types=("sliding", "global", "global")), ["sliding_window"]),
    (dict(sliding_window=4), ["sliding_window", "layer_types"]),
    (dict(layer_types=("global",) * 3, sliding_window=4), ["sliding_window"]),
    (dict(rope_local_base=1e4), ["rope_local_base", "sliding"]),
    (dict(rope_scaling={"rope_type": "quantum"}), ["quantum", "linear", "longrope"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["llama3", "low_freq_factor"]),
    (dict(rope_scaling={"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0],
                        "original_max_position_embeddings": 8}), ["long_factor", "4"]),
    (dict(rope_scaling={"rope_type": "linear", "factor": -1.0}), ["factor"]),
    (dict(positional="learned", rope_scaling={"rope_type": "linear", "factor": 2.0}),
     ["rope_scaling", "rope"]),
    (dict(attn_softcap=0.0), ["attn_softcap"]),
    (dict(attn_softcap=30.0, attn_kernel="sdpa"), ["attn_softcap", "sdpa"]),
    (dict(final_softcap=float("nan")), ["final_softcap"]),
    (dict(embed_scale=0.0), ["embed_scale"]),
    (dict(norm_placement="sandwich", parallel_attn_mlp=True), ["sandwich", "parallel"]),
    (dict(norm_placement="post_branch", norm="none"), ["post_branch", "norm"]),
])
def test_bad_variant_is_one_sentence(kw: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        ModelConfig(**{**BASE, **kw})
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_round_trip_and_replace() -> None:
    cfg = ModelConfig(**{**GEMMA_LIKE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 16}})
    assert isinstance(cfg.rope_scaling, RopeScaling) and cfg.layer_types[2] == "global"
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.rope_scaling == cfg.rope_scaling
    assert [cfg.is_sliding_layer(i) for i in range(3)] == [True, True, False]
    assert cfg.replace(d_model=64, n_heads=8).layer_types == cfg.layer_types
    hash(cfg)  # every new field is hashable: configs stay usable as keys


def test_sliding_pattern_is_full_size_with_zeros() -> None:
    model = _model(**GEMMA_LIKE)
    T, w = 10, 3
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, T)))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for layer in range(3):
        p = cache["pattern", layer]
        assert p.shape == (2, 4, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(2, 4, T))
        assert p[..., k > q].abs().max() == 0
        reaches_back = p[..., (q - k >= w) & (k <= q)].abs().max() > 0
        assert reaches_back == (layer == 2), layer  # only the global layer sees far keys


def test_softcap_between_its_hooks() -> None:
    model = _model(**{**GEMMA_LIKE, "attn_softcap": 1.0})
    tokens = torch.randint(0, 50, (1, 8))
    logits, cache = model.run_with_cache(tokens)
    pre, post = cache["blocks.0.attn.hook_attn_scores_precap"], cache["attn_scores", 0]
    tril = torch.ones(8, 8, dtype=torch.bool).tril()
    visible = tril & ~tril.tril(-3)
    expect = torch.tanh(pre)
    assert torch.allclose(post[..., visible], expect[..., visible], atol=1e-6)
    assert pre.abs().max() > 2.0  # the cap actually bends something
    lp, lc = cache["unembed.hook_logits_precap"], cache["unembed.hook_logits"]
    assert torch.allclose(lc, 4.0 * torch.tanh(lp / 4.0)) and torch.equal(lc, logits)
    assert logits.abs().max() < 4.0 < lp.abs().max()


def test_sandwich_and_post_branch_norms_in_the_branch() -> None:
    for placement, pre in (("sandwich", True), ("post_branch", False)):
        model = _model(**{**GEMMA_LIKE, "norm_placement": placement})
        _, cache = model.run_with_cache(torch.randint(0, 50, (1, 6)))
        blk = model.blocks[0]
        assert (blk.ln1 is not None) == pre and hasattr(blk, "ln1_post")
        assert torch.equal(cache["blocks.0.ln1_post.hook_normalized"], cache["attn_out", 0])
        assert torch.equal(cache["blocks.0.ln2_post.hook_normalized"], cache["mlp_out", 0])
        assert torch.allclose(cache["resid_mid", 0], cache["resid_pre", 0] + cache["attn_out", 0])
        # the branch output is RMS-normalised (times its weight, 1 at init)
        rms = cache["attn_out", 0].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_embed_scale() -> None:
    model = _model(**GEMMA_LIKE)
    tokens = torch.randint(0, 50, (1, 5))
    _, cache = model.run_with_cache(tokens)
    assert torch.allclose(cache["hook_embed"], model.W_E[tokens] * 32**0.5)


def test_local_rope_base() -> None:
    """Sliding layers rotate with rope_local_base, global ones with rope_base."""
    model = _model(**GEMMA_LIKE)
    _, cache = model.run_with_cache(torch.randint(0, 50, (1, 6)))
    for layer, base in ((0, 1e4), (2, 1e6)):
        q, rot = cache["q", layer], cache[f"blocks.{layer}.attn.hook_rot_q"]
        cos, sin = rope_cos_sin(torch.arange(6), 8, base, False, torch.float32)
        h = 4
        rotated = torch.cat([-q[..., h:], q[..., :h]], -1)
        assert torch.allclose(rot, q * cos[None, :, None] + rotated * sin[None, :, None],
                              atol=1e-5)


def test_rope_scaling_formulas() -> None:
    """Each type against its paper's statement, independently of the implementation."""
    dim, base = 8, 1e4
    plain = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    lin, f = RopeScaling("linear", factor=4.0).inv_freq(dim, base, 64, 10)
    assert torch.allclose(lin, plain / 4) and f == 1.0  # position p behaves as p / 4
    dyn = RopeScaling("dynamic", factor=2.0)
    assert torch.allclose(dyn.inv_freq(dim, base, 64, 30)[0], plain)  # within n_ctx: plain
    grown = base * (2.0 * 128 / 64 - 1) ** (dim / (dim - 2))
    assert torch.allclose(dyn.inv_freq(dim, base, 64, 128)[0],
                          1.0 / grown ** (torch.arange(0, dim, 2).float() / dim))
    l3, _ = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192).inv_freq(128, 5e5, 131072, 10)
    wavelen = 2 * math.pi / (1.0 / 5e5 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.allclose(l3[wavelen < 8192 / 4], (1.0 / 5e5 ** (torch.arange(0, 128, 2).float()
                                                               / 128))[wavelen < 8192 / 4])
    assert torch.allclose(l3[wavelen > 8192], (1.0 / 5e5 ** (torch.arange(0, 128, 2).float()
                                                           / 128))[wavelen > 8192] / 8)
    yarn, m = RopeScaling("yarn", factor=4.0, original_max_position_embeddings=16).inv_freq(
        dim, base, 64, 10)
    assert m == pytest.approx(0.1 * math.log(4.0) + 1)
    assert yarn[0] == pytest.approx(plain[0]) and yarn[-1] == pytest.approx(plain[-1] / 4)
    lr = RopeScaling("longrope", short_factor=(1.0,) * 4, long_factor=(2.0,) * 4,
                     original_max_position_embeddings=16)
    short, a = lr.inv_freq(dim, base, 64, 16)
    long, _ = lr.inv_freq(dim, base, 64, 17)
    assert torch.allclose(short, plain) and torch.allclose(long, plain / 2)
    assert a == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))


def test_kv_cache_past_the_window_equals_recomputation() -> None:
    model = _model(**GEMMA_LIKE)
    tokens = torch.randint(0, 50, (2, 14))
    full = model(tokens)
    cache = interp.KVCache(3)
    steps = [model(tokens[:, :2], past_kv=cache)]
    steps += [model(tokens[:, i:i + 1], past_kv=cache) for i in range(2, 14)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    out = model.generate(tokens[:, :3], max_new_tokens=12)
    again = model.generate(tokens[:, :3], max_new_tokens=12, use_cache=False)
    assert torch.equal(out, again)


def test_sdpa_equals_eager_with_sliding_layers() -> None:
    kw = {k: v for k, v in GEMMA_LIKE.items() if k != "attn_softcap"}
    eager, auto = _model(**kw, attn_kernel="eager"), _model(**kw, attn_kernel="auto")
    tokens = torch.randint(0, 50, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    keep = mask.bool()
    for m in (None, mask):
        gap = (eager(tokens, attention_mask=m) - auto(tokens, attention_mask=m))[keep]
        assert gap.abs().max() < 1e-5


def test_override_attention_keeps_the_window() -> None:
    """An attention override replaces the stack mask; sliding layers still add their window."""
    model = _model(**GEMMA_LIKE)
    tokens = torch.randint(0, 50, (1, 8))
    with model.override_attention(mask="bidirectional"):
        _, cache = model.run_with_cache(tokens)
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    p0, p2 = cache["pattern", 0][0, 0], cache["pattern", 2][0, 0]
    assert p0[(q - k).abs() >= 3].abs().max() == 0 and p2[k > q].abs().max() > 0


def test_info_prints_the_per_layer_pattern(tmp_path: Path) -> None:
    """``interp info`` lists every layer's attention kind, RoPE and soft-cap, also as JSON."""
    from click.testing import CliRunner

    from analyses.app.cli import cli

    cfg = ModelConfig(**{**GEMMA_LIKE, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    path = tmp_path / "gemma_like.json"
    path.write_text(json.dumps(cfg.to_dict()))
    result = CliRunner().invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.split("layers (attention, RoPE, soft-cap):\n")[1].splitlines()[:3]
    assert "sliding(3) rope base 10000 softcap 5" in lines[0]
    assert "global(causal) rope base 1e+06 linear(factor=8.0) softcap 5" in lines[2]
    data = json.loads(CliRunner().invoke(cli, ["info", str(path), "--json"]).output)
    assert [x.split()[0] for x in data["layers"]] == ["sliding(3)", "sliding(3)", "global(causal)"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """A model with every new field saves and loads back to the same config and logits."""
    from interp.checkpoint import save_checkpoint

    model = _model(**{**GEMMA_LIKE, "rope_scaling": {
        "rope_type": "longrope", "long_factor": [1.0, 2.0, 3.0, 4.0], "short_factor": [1.0] * 4,
        "original_max_position_embeddings": 8}})
    back = interp.load_pretrained(save_checkpoint(model, tmp_path / "g.pt"))
    tokens = torch.randint(0, 50, (1, 12))
    assert back.cfg == model.cfg and torch.equal(back(tokens), model(tokens))
