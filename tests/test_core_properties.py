"""Property tests: random valid configs build and run; random invalid ones raise ValueError only.

Valid configs are drawn across every variant family at once (so combinations nobody wrote a
test for are exercised); invalid ones take a valid config and put an arbitrary value (wrong
type, zero, negative, NaN, unknown literal, ...) in one field. A config either refuses with a
``ValueError`` or is accepted, in which case it must build and run like any valid one.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp import ModelConfig, build_model, masks

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

MASKS = [
    "causal",
    "bidirectional",
    "prefix_lm:2",
    "causal&sliding_window:3",
    "block_sparse:3",
    "causal&strided:2",
    masks.causal() & ~masks.strided(3) | masks.sliding_window(1),
]


@st.composite
def valid_configs(draw) -> dict:
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0]))
    d_head = draw(st.sampled_from([2, 4, 6]))
    arch = draw(st.sampled_from(["decoder", "encoder", "encoder_decoder"]))
    kernel = draw(st.sampled_from(["auto", "eager", "sdpa", "linear"]))
    positional = draw(
        st.sampled_from(["none", "sinusoidal", "learned", "rope", "alibi", "relative"])
    )
    if kernel == "linear" and positional in ("alibi", "relative"):
        positional = "rope"
    kw: dict = dict(
        n_layers=draw(st.integers(1, 2)),
        d_model=draw(st.sampled_from([8, 12])),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=d_head,
        d_mlp=draw(st.integers(1, 20)),
        d_vocab=draw(st.integers(2, 30)),
        n_ctx=draw(st.integers(8, 12)),
        architecture=arch,
        attn_kernel=kernel,
        positional=positional,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm", "none"])),
        act=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])),
        tie_embeddings=draw(st.booleans()),
        attn_qkv_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
    )
    if positional == "rope":
        kw["rotary_dim"] = draw(st.sampled_from([d for d in (2, 4, 6) if d <= d_head]))
        kw["rope_interleaved"] = draw(st.booleans())
    parallel = arch != "encoder_decoder" and draw(st.booleans())
    kw["parallel_attn_mlp"] = parallel
    kw["norm_placement"] = "pre" if parallel else draw(st.sampled_from(["pre", "post"]))
    if kw["norm"] != "none":
        kw["embed_norm"] = arch != "encoder_decoder" and draw(st.booleans())
    if arch == "decoder" and kernel != "linear":
        kw["mask"] = draw(st.sampled_from(MASKS))
    if kernel != "linear" and draw(st.booleans()):
        kw["soft_mask_penalty"] = draw(st.floats(0, 50))
        kw["attn_temperature"] = draw(st.floats(0.25, 4))
    if arch != "encoder_decoder" and not parallel and draw(st.booleans()):
        kw["attn_only"] = True
    elif arch != "encoder_decoder" and draw(st.booleans()):
        n_exp = draw(st.integers(1, 4))
        kw.update(
            n_experts=n_exp,
            experts_per_token=draw(st.integers(1, n_exp)),
            router=draw(st.sampled_from(["softmax_topk", "topk_softmax"])),
            router_renormalize=draw(st.booleans()),
            n_shared_experts=draw(st.integers(0, 1)),
            moe_layers=draw(st.sets(st.integers(0, kw["n_layers"] - 1), min_size=1)),
        )
        if kw["n_shared_experts"]:
            kw["shared_expert_gate"] = draw(st.booleans())
    if arch == "encoder" and draw(st.booleans()):
        kw["n_token_types"] = 2
    return kw


def _run(model, batch: int, pos: int) -> None:
    cfg = model.cfg
    t = torch.randint(0, cfg.d_vocab, (batch, pos))
    if not cfg.has_unembed:  # a bare encoder: final states only
        hidden = (
            model(t, t[:, :2], return_type="hidden")
            if cfg.architecture == "encoder_decoder"
            else model(t, return_type="hidden")
        )
        assert hidden.shape[0] == batch and hidden.shape[-1] == cfg.d_model
        loss = hidden.pow(2).mean()
    elif cfg.architecture == "encoder_decoder":
        logits, loss = model(t, t[:, : max(2, pos // 2)], return_type="both")
        assert logits.shape == (batch, max(2, pos // 2), cfg.d_vocab_out)
    elif cfg.architecture == "encoder":
        labels = t.clone()
        logits, loss = model(t, return_type="both", labels=labels)
        assert logits.shape == (batch, pos, cfg.d_vocab_out)
    else:
        am = torch.ones_like(t)
        am[0, :1] = 0  # one left-padded row
        logits, loss = model(t, attention_mask=am, return_type="both")
        assert logits.shape == (batch, pos, cfg.d_vocab_out)
        assert bool(torch.isfinite(logits).all())
    assert bool(torch.isfinite(loss)), loss
    loss.backward()
    rt = "logits" if cfg.has_unembed else "hidden"
    _, cache = (
        model.run_with_cache(t, t[:, :2], return_type=rt)
        if cfg.architecture == "encoder_decoder"
        else model.run_with_cache(t, return_type=rt)
    )
    for name in cache.keys():
        if name.endswith("hook_pattern"):
            p = cache[name]
            assert p.shape[:2] == (batch, cfg.n_heads) and p.shape[-1] in (pos, 2)


@SETTINGS
@given(kw=valid_configs(), batch=st.integers(1, 3), pos=st.integers(2, 8))
def test_random_valid_configs_build_and_run(kw: dict, batch: int, pos: int) -> None:
    cfg = ModelConfig(**kw)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg) == cfg == cfg.replace()  # a no-op replace changes nothing
    model = build_model(cfg)
    _run(model, batch, pos)


ANY_VALUE = st.one_of(
    # floats up to 1e3 (an accepted init_std of 1e9 overflows, as it would anywhere), NaN and inf
    st.integers(-3, 40),
    st.floats(-1e3, 1e3),
    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["rope", "causal", "swiglu", "pre", "linear", "sliding_window:0", "gelu"]),
    st.lists(st.integers(-2, 3), max_size=3),
    st.tuples(st.integers(-1, 3)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just({"op": "and", "a": {"name": "causal"}}),
    st.just({"name": "sliding_window", "args": [1, 2]}),
    st.just(object()),
    st.just(1.5),
    st.just(0),
    st.just(-1),
    st.just(float("nan")),
)
FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
VALID_BASE = dict(n_layers=1, d_model=8, n_heads=2, d_vocab=11, n_ctx=8)


# construction is microseconds and most draws are refused, so this one affords more examples
@settings(SETTINGS, max_examples=150)
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, min_size=1, max_size=3),
    moe=st.booleans(),
    positional=st.sampled_from(["rope", "relative", "learned"]),
)
def test_arbitrary_field_values_raise_value_error_or_work(
    changes: dict, moe: bool, positional: str
) -> None:
    kw = dict(VALID_BASE, positional=positional)
    if moe:
        kw.update(n_experts=2, experts_per_token=1)
    kw.update(changes)
    try:
        cfg = ModelConfig(**kw)
    except ValueError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return
    # accepted: then it is a working config (every field holds a value of its documented type)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    _run(build_model(cfg), 2, 4)


BAD = [
    dict(n_layers=0),
    dict(d_model=-4),
    dict(n_heads=3),
    dict(n_heads=0),
    dict(d_head=0),
    dict(n_kv_heads=3),
    dict(n_kv_heads=0),
    dict(d_mlp=0),
    dict(d_vocab=2.0),
    dict(n_ctx="8"),
    dict(n_layers=True),
    dict(architecture="seq2seq"),
    dict(positional="rotary"),
    dict(norm="batchnorm"),
    dict(norm_placement="middle"),
    dict(act="tanh"),
    dict(attn_kernel="flash"),
    dict(router="hash", n_experts=2),
    dict(mask="diagonal"),
    dict(mask="sliding_window:0"),
    dict(mask="sliding_window:x"),
    dict(mask=5),
    dict(mask={"op": "and"}),
    dict(positional="rope", rotary_dim=3),
    dict(positional="rope", rotary_dim=10),
    dict(rotary_dim=2),
    dict(n_experts=2, experts_per_token=3),
    dict(n_experts=-1),
    dict(n_shared_experts=1),
    dict(n_experts=2, moe_layers=(1,)),
    dict(n_experts=2, moe_layers=(0.5,)),
    dict(n_experts=2, moe_layers=()),
    dict(moe_layers=(0,)),
    dict(d_expert=4),
    dict(attn_only=True, n_experts=2),
    dict(parallel_attn_mlp=True, norm_placement="post"),
    dict(parallel_attn_mlp=True, attn_only=True),
    dict(norm="none", embed_norm=True),
    dict(norm="none", qk_norm="full"),
    dict(attn_kernel="linear", positional="alibi"),
    dict(attn_kernel="linear", mask="prefix_lm:2"),
    dict(attn_kernel="linear", soft_mask_penalty=1.0),
    dict(attn_kernel="linear", attn_temperature=2.0),
    dict(soft_mask_penalty=-1.0),
    dict(soft_mask_penalty=float("nan")),
    dict(attn_temperature=0.0),
    dict(attn_temperature=float("inf")),
    dict(attn_scale=-1.0),
    dict(norm_eps=0.0),
    dict(rope_base=-5.0),
    dict(tie_embeddings=True, d_vocab_out=7),
    dict(mlm_head=True, has_unembed=False),
    dict(tie_embeddings=True, has_unembed=False),
    dict(architecture="encoder_decoder", mask="prefix_lm:2"),
    dict(architecture="encoder_decoder", n_experts=2),
    dict(n_decoder_layers=2),
    dict(architecture="encoder_decoder", embed_norm=True),
    dict(architecture="encoder_decoder", n_decoder_layers=0),
    dict(n_token_types=-1),
    dict(positional="relative", relative_buckets=2),
    dict(positional="relative", relative_max_distance=0),
    dict(relative_buckets="many"),
    dict(experts_per_token=0),
    dict(shared_expert_gate=True, n_experts=2),
    dict(extra="provenance"),
    dict(moe_aux_loss_coef=-0.1),
    dict(router_z_loss_coef=float("inf")),
    dict(init_std=0),
    dict(logit_scale=0.0),
    dict(rope_interleaved="yes"),
    dict(linear_feature_map="softplus"),
    dict(qk_norm=True),
    dict(_derived=[("d_head", 4)]),  # the private record of derived fields is checked too
    dict(_derived=(("n_layers", 1),)),
]


@pytest.mark.parametrize("kw", BAD, ids=str)
def test_known_invalid_configs_raise_value_error(kw: dict) -> None:
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**VALID_BASE, **kw})
    msg = str(info.value)
    assert "\n" not in msg and len(msg) > 20 and msg.endswith("."), msg


def test_from_dict_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="Unknown config field.*n_layer"):
        ModelConfig.from_dict(dict(VALID_BASE, n_layer=2))
    with pytest.raises(ValueError, match="missing required field.*d_vocab"):
        ModelConfig.from_dict(dict(n_layers=1, d_model=8, n_heads=2, n_ctx=4))
    with pytest.raises(ValueError, match="stride"):
        ModelConfig.from_dict(dict(VALID_BASE, mask={"name": "strided", "args": ["a"]}))
    with pytest.raises(ValueError, match="Malformed serialised mask"):
        ModelConfig.from_dict(dict(VALID_BASE, mask={"op": "or", "a": {"name": "causal"}}))
    assert math.isclose(
        ModelConfig.from_dict(dict(VALID_BASE, attn_temperature=2)).attn_temperature, 2
    )
