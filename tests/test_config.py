"""ModelConfig: derived fields follow their sources through ``replace``; ``extra`` is read-only.

Issue 17 item 1: ``dataclasses.replace(cfg, d_model=128, n_heads=4)`` used to keep the old
``d_head``. Now a field left unset is derived afresh after a replace, and a field the user set
stays. One test per derived field, a property test (a replaced config equals the config built
fresh from the same sources), serialisation, and a real checkpoint loaded with an override.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp import ModelConfig
from interp.config import DERIVED_FIELDS
from interp.masks import Bidirectional, Causal

BASE = dict(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
MOE = dict(BASE, n_experts=4, experts_per_token=2)


def _cfg(**kw: Any) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


# --- every derived field follows its source through dataclasses.replace ---


def test_issue_example_d_head_follows_d_model_and_n_heads() -> None:
    cfg = _cfg(n_heads=8)
    assert cfg.d_head == 8
    assert dataclasses.replace(cfg, d_model=128, n_heads=4).d_head == 32


def test_d_mlp_follows_d_model() -> None:
    assert dataclasses.replace(_cfg(), d_model=128).d_mlp == 512


def test_n_kv_heads_follows_n_heads() -> None:
    assert dataclasses.replace(_cfg(), n_heads=8).n_kv_heads == 8


def test_d_vocab_out_follows_d_vocab() -> None:
    assert dataclasses.replace(_cfg(), d_vocab=300).d_vocab_out == 300


def test_rotary_dim_follows_d_head() -> None:
    cfg = _cfg(positional="rope")
    assert cfg.rotary_dim == 16
    assert dataclasses.replace(cfg, n_heads=2).rotary_dim == 32
    assert dataclasses.replace(cfg, positional="learned").rotary_dim is None  # no longer applies


def test_d_expert_follows_d_mlp() -> None:
    cfg = ModelConfig(**MOE)
    assert cfg.d_expert == 256
    assert dataclasses.replace(cfg, d_mlp=100).d_expert == 100
    dense = dataclasses.replace(cfg, n_experts=0)  # MoE-only derived fields are dropped, not kept
    assert (dense.d_expert, dense.d_shared_expert, dense.moe_layers) == (None, None, None)


def test_d_shared_expert_follows_d_expert() -> None:
    cfg = ModelConfig(**MOE, n_shared_experts=1)
    assert cfg.d_shared_expert == 256
    assert dataclasses.replace(cfg, d_expert=48).d_shared_expert == 48
    assert dataclasses.replace(cfg, d_model=32).d_shared_expert == 128  # d_model -> d_mlp -> ...


def test_moe_layers_follow_n_layers() -> None:
    cfg = ModelConfig(**MOE)
    assert cfg.moe_layers == (0, 1)
    assert dataclasses.replace(cfg, n_layers=4).moe_layers == (0, 1, 2, 3)


def test_mask_follows_architecture() -> None:
    cfg = _cfg()
    assert cfg.mask == Causal()
    enc = dataclasses.replace(cfg, architecture="encoder")
    assert enc.mask == Bidirectional()
    assert dataclasses.replace(enc, architecture="decoder").mask == Causal()


def test_n_decoder_layers_follows_n_layers() -> None:
    cfg = _cfg(architecture="encoder_decoder", positional="relative")
    assert cfg.n_decoder_layers == 2
    assert dataclasses.replace(cfg, n_layers=5).n_decoder_layers == 5
    assert dataclasses.replace(cfg, architecture="decoder").n_decoder_layers is None


def test_default_prepend_bos_follows_architecture() -> None:
    cfg = _cfg()
    assert cfg.default_prepend_bos is True
    enc = dataclasses.replace(cfg, architecture="encoder")
    assert enc.default_prepend_bos is False
    off = cfg.replace(default_prepend_bos=False)
    assert dataclasses.replace(off, d_model=128).default_prepend_bos is False  # set: it stays
    with pytest.raises(ValueError, match="default_prepend_bos must be True or False"):
        _cfg(default_prepend_bos="yes")


def test_every_derived_field_has_a_test_above() -> None:
    assert set(DERIVED_FIELDS) == {
        "d_head", "d_mlp", "n_kv_heads", "d_vocab_out", "rotary_dim", "d_expert",
        "d_shared_expert", "moe_layers", "mask", "n_decoder_layers",
        "default_prepend_bos",
    }


def test_explicit_fields_stay_after_replace() -> None:
    cfg = ModelConfig(**MOE, n_shared_experts=1, d_head=8, d_mlp=40, n_kv_heads=2,
                      d_vocab_out=120, positional="rope", rotary_dim=4, d_expert=24,
                      d_shared_expert=12, moe_layers=(1,), mask="causal&sliding_window:3")
    new = dataclasses.replace(cfg, d_model=128, n_heads=8, d_vocab=200, n_layers=3)
    kept = ("d_head", "d_mlp", "n_kv_heads", "d_vocab_out", "rotary_dim", "d_expert",
            "d_shared_expert", "moe_layers", "mask")
    assert {k: getattr(new, k) for k in kept} == {k: getattr(cfg, k) for k in kept}
    assert new == cfg.replace(d_model=128, n_heads=8, d_vocab=200, n_layers=3)
    arch = _cfg(architecture="encoder_decoder", n_decoder_layers=1, positional="relative")
    assert dataclasses.replace(arch, n_layers=4).n_decoder_layers == 1


def test_explicitly_unset_field_is_derived() -> None:
    cfg = _cfg(d_head=8)
    assert dataclasses.replace(cfg, d_head=None).d_head == 16
    assert cfg.replace(d_head=None).d_head == 16


def test_the_documented_ambiguous_edge_and_its_exact_form() -> None:
    """dataclasses.replace cannot tell "passed the derived value again" from "copied it"."""
    cfg = _cfg()  # d_head derived to 16
    assert dataclasses.replace(cfg, d_model=128, d_head=16).d_head == 32  # counted as derived
    exact = cfg.replace(d_model=128, d_head=16)  # the exact form: what is passed is explicit
    assert exact.d_head == 16
    assert dataclasses.replace(exact, d_model=256).d_head == 16  # and stays explicit after
    assert cfg.replace().d_head == 16 and cfg.replace() == cfg


def test_replace_method_refuses_private_and_unknown_fields() -> None:
    with pytest.raises(TypeError, match="private"):
        _cfg().replace(_derived=())
    with pytest.raises(TypeError):
        _cfg().replace(n_layer=3)


def test_replace_validates() -> None:
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        dataclasses.replace(_cfg(), n_heads=3)
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        _cfg().replace(n_heads=3)


# --- serialisation, equality, read-only extra ---


def test_round_trip_and_private_field_hidden() -> None:
    cfg = ModelConfig(**MOE, positional="rope", extra={"source": "test"})
    d = cfg.to_dict()
    assert "_derived" not in d and type(d["extra"]) is dict
    back = ModelConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.to_dict() == d and hash(back) == hash(cfg)
    # read back from its dict, a config still follows its sources
    assert dataclasses.replace(back, d_model=128).d_head == 32
    assert dataclasses.replace(back, n_layers=3).moe_layers == (0, 1, 2)
    with pytest.raises(ValueError, match="Unknown config field.*_derived"):
        ModelConfig.from_dict({**d, "_derived": []})


def test_equality_and_hash_ignore_the_record() -> None:
    derived, explicit = _cfg(), _cfg(d_head=16, d_mlp=256, n_kv_heads=4, d_vocab_out=100)
    assert derived == explicit and hash(derived) == hash(explicit)
    assert "_derived" not in repr(derived)


def test_private_record_is_checked() -> None:
    with pytest.raises(ValueError, match="_derived"):
        _cfg(_derived=[("d_head", 16)])
    with pytest.raises(ValueError, match="_derived"):
        _cfg(_derived=(("n_layers", 2),))


def test_extra_is_read_only() -> None:
    given = {"source": "test", "task": {"name": "copy"}}
    cfg = _cfg(extra=given)
    given["source"] = "changed later"  # the config holds its own copy
    assert cfg.extra["source"] == "test"
    for mutate in (lambda e: e.__setitem__("k", 1), lambda e: e.setdefault("k", 1),
                   lambda e: e.update(k=1), lambda e: e.pop("source"), lambda e: e.clear(),
                   lambda e: e.__delitem__("source"), lambda e: e.popitem()):
        with pytest.raises(TypeError, match="read-only"):
            mutate(cfg.extra)
    with pytest.raises(TypeError, match="read-only"):
        cfg.extra |= {"k": 1}
    assert dict(cfg.extra) == {"source": "test", "task": {"name": "copy"}}
    added = cfg.replace(extra={**cfg.extra, "dropped": ["x"]})
    assert added.extra["dropped"] == ["x"] and added == cfg  # equality ignores extra, as before
    assert json.loads(json.dumps(cfg.extra)) == dict(cfg.extra)


def test_copy_deepcopy_and_pickle() -> None:
    cfg = ModelConfig(**MOE, extra={"source": "test"})
    for other in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert other == cfg and dict(other.extra) == dict(cfg.extra)
        with pytest.raises(TypeError):
            other.extra["k"] = 1  # type: ignore[index]
        assert dataclasses.replace(other, d_model=128).d_head == 32  # the record survives


# --- property: replace == fresh construction from the same sources ---


@st.composite
def sources(draw: Any) -> dict[str, Any]:
    """Source kwargs of a config: required sizes, some choices, a few explicit widths."""
    arch = draw(st.sampled_from(["decoder", "encoder", "encoder_decoder"]))
    kw: dict[str, Any] = dict(
        n_layers=draw(st.integers(1, 3)), d_model=draw(st.sampled_from([8, 12, 16])),
        n_heads=draw(st.sampled_from([1, 2, 4])), d_vocab=draw(st.integers(5, 30)),
        n_ctx=draw(st.integers(4, 16)), architecture=arch,
        positional=draw(st.sampled_from(["learned", "rope", "relative"])),
    )
    if arch != "encoder_decoder" and draw(st.booleans()):
        kw.update(n_experts=draw(st.integers(1, 3)), experts_per_token=1,
                  n_shared_experts=draw(st.integers(0, 1)))
    optional = {
        "d_head": st.sampled_from([2, 4, 8]), "d_mlp": st.integers(2, 40),
        "n_kv_heads": st.just(1), "d_vocab_out": st.integers(5, 30),
        "rotary_dim": st.just(2), "d_expert": st.integers(2, 20),
        "d_shared_expert": st.integers(2, 20), "moe_layers": st.just((0,)),
        "n_decoder_layers": st.integers(1, 3), "mask": st.sampled_from(["causal", "bidirectional"]),
    }
    moe = "n_experts" in kw
    applies = {"rotary_dim": kw["positional"] == "rope",
               "n_decoder_layers": arch == "encoder_decoder", "mask": arch != "encoder_decoder",
               "d_expert": moe, "d_shared_expert": moe, "moe_layers": moe}
    names = sorted(k for k in optional if applies.get(k, True))
    for name in draw(st.sets(st.sampled_from(names), max_size=3)):
        kw[name] = draw(optional[name])
    return kw


CHANGES = {
    "n_layers": st.integers(1, 4), "d_model": st.sampled_from([8, 12, 16, 24]),
    "n_heads": st.sampled_from([1, 2, 3, 4]), "d_vocab": st.integers(5, 40),
    "architecture": st.sampled_from(["decoder", "encoder", "encoder_decoder"]),
    "positional": st.sampled_from(["learned", "rope", "relative"]),
    "n_experts": st.integers(0, 3), "n_ctx": st.integers(4, 16),
    "d_head": st.sampled_from([None, 2, 4, 6, 8]), "d_mlp": st.sampled_from([None, 4, 32, 48]),
    "n_kv_heads": st.sampled_from([None, 1, 2]), "d_vocab_out": st.sampled_from([None, 5, 40]),
    "rotary_dim": st.sampled_from([None, 2, 4]), "d_expert": st.sampled_from([None, 4, 32]),
    "d_shared_expert": st.sampled_from([None, 6, 48]), "moe_layers": st.sampled_from([None, (0,)]),
    "n_decoder_layers": st.sampled_from([None, 1, 2]),
    "mask": st.sampled_from([None, "causal", "bidirectional"]),
    "tie_embeddings": st.booleans(),
}
CHANGE = st.fixed_dictionaries({}, optional=CHANGES)


def _fresh(kw: dict[str, Any]) -> ModelConfig | None:
    try:
        return ModelConfig(**kw)
    except ValueError:
        return None


def _hits_edge(kw: dict[str, Any], cfg: ModelConfig, changes: dict[str, Any]) -> bool:
    """The documented ambiguity: a derived field passed its own derived value again."""
    return any(kw.get(k) is None and v is not None and type(v) is type(getattr(cfg, k))
               and v == getattr(cfg, k) for k, v in changes.items() if k in DERIVED_FIELDS)


def _derived_names(cfg: ModelConfig) -> set[str]:
    return {name for name, _ in cfg._derived}


def _check_step(kw: dict[str, Any], cfg: ModelConfig,
                changes: dict[str, Any]) -> ModelConfig | None:
    """replace(cfg, **changes) against ModelConfig(**kw, **changes); the new config or None."""
    fresh = _fresh({**kw, **changes})
    edge = _hits_edge(kw, cfg, changes)
    if fresh is None:
        with pytest.raises(ValueError):
            cfg.replace(**changes)
        if not edge:
            with pytest.raises(ValueError):
                dataclasses.replace(cfg, **changes)
        return None
    exact = cfg.replace(**changes)
    assert exact == fresh and _derived_names(exact) == _derived_names(fresh)
    if not edge:
        new = dataclasses.replace(cfg, **changes)
        assert new == fresh and _derived_names(new) == _derived_names(fresh)
    return fresh


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(kw=sources(), first=CHANGE, second=CHANGE)
def test_replace_equals_fresh_construction(kw: dict[str, Any], first: dict[str, Any],
                                           second: dict[str, Any]) -> None:
    cfg = _fresh(kw)
    if cfg is None:
        return  # an invalid draw of sources: nothing to replace
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    if _check_step(kw, cfg, first) is None:
        return
    mid = cfg.replace(**first)
    _check_step({**kw, **first}, mid, second)  # twice in a row: the record carries over


# --- a real checkpoint with an override ---


@pytest.mark.slow
def test_load_pretrained_with_n_ctx_override() -> None:
    """SmolLM2-135M (RoPE, GQA 9/3 heads): n_ctx=64 changes n_ctx only; logits are the same."""
    import interp

    default = interp.load_pretrained("smollm2-135m")
    short = interp.load_pretrained("smollm2-135m", n_ctx=64)
    assert short.cfg.n_ctx == 64 and default.cfg.n_ctx > 64
    assert (short.cfg.d_head, short.cfg.n_kv_heads, short.cfg.rotary_dim) == (64, 3, 64)
    assert (short.cfg.d_vocab_out, short.cfg.mask) == (default.cfg.d_vocab, Causal())
    for name in DERIVED_FIELDS:  # every derived field as the default load has it
        assert getattr(short.cfg, name) == getattr(default.cfg, name), name
    assert short.cfg.to_dict() == {**default.cfg.to_dict(), "n_ctx": 64}
    assert short.cfg == dataclasses.replace(default.cfg, n_ctx=64)
    tokens = torch.tensor([[1, 510, 2111, 314, 253, 3457, 30]])
    with torch.no_grad():
        torch.testing.assert_close(short(tokens), default(tokens), rtol=0, atol=0)


# --- issue 24: values that used to construct and then fail at forward time are refused ---

REFUSED = [  # (changes to BASE, a word the one-line message must contain)
    (dict(positional="relative", relative_buckets=32, relative_max_distance=16),
     "relative_max_distance"),  # causal: 16 exact offsets, so the log buckets went negative
    (dict(positional="relative", relative_buckets=32, relative_max_distance=8,
          mask="bidirectional"), "relative_max_distance"),  # 8 exact offsets per direction
    (dict(positional="relative", relative_max_distance=10**400), "relative_max_distance"),
    (dict(mask="causal&sliding_window:" + str(10**30)), "window"),
    (dict(mask="prefix_lm:" + str(2**63)), "prefix"),
    (dict(mask={"name": "block_sparse", "args": [True]}), "block"),
    (dict(mask={"op": "and", "a": {"name": "causal"},
                "b": {"name": "strided", "args": [10**30]}}), "stride"),
    (dict(mask="sliding_window:abc"), "sliding_window"),
    (dict(mask="&".join(["causal"] * 2000)), "nested"),  # RecursionError in the forward
    (dict(soft_mask_penalty=1e300), "soft_mask_penalty"),
    (dict(soft_mask_penalty=10**400), "soft_mask_penalty"),
    (dict(soft_mask_penalty=float("inf")), "soft_mask_penalty"),
    (dict(attn_temperature=1e300), "attn_temperature"),
    (dict(attn_temperature=1e-300), "attn_temperature"),
    (dict(attn_scale=1e-300), "attn_scale"),
    (dict(attn_scale=1e300), "attn_scale"),
    (dict(logit_scale=3.5e38), "logit_scale"),
    (dict(init_std=1e300), "init_std"),
    (dict(rope_base=10**400), "rope_base"),
    (dict(norm_eps=10**400), "norm_eps"),
    (dict(moe_aux_loss_coef=1e300, **MOE), "moe_aux_loss_coef"),
    (dict(router_z_loss_coef=10**400, **MOE), "router_z_loss_coef"),
    (dict(n_layers=10**15), "n_layers"),
    (dict(MOE, n_layers=10**15), "n_layers"),  # deriving moe_layers was a MemoryError
    (dict(architecture="encoder_decoder", n_decoder_layers=10**15), "n_decoder_layers"),
    (dict(MOE, n_experts=10**7), "n_experts"),
    (dict(n_ctx=8.0), "n_ctx"),
    (dict(d_model=True), "d_model"),
]


@pytest.mark.parametrize("changes,word", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_values_that_cannot_run_are_refused_with_one_line(changes: dict[str, Any],
                                                          word: str) -> None:
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**BASE, **changes})
    msg = str(info.value)
    assert word in msg and "\n" not in msg, msg
    assert type(info.value) is ValueError  # not an OverflowError or MemoryError


ACCEPTED = [  # the bounds are where running breaks, not stricter: these stay valid
    dict(positional="relative", relative_buckets=32, relative_max_distance=17),
    dict(positional="relative", relative_buckets=32, relative_max_distance=9,
         architecture="encoder", mask="bidirectional"),
    dict(positional="relative", relative_buckets=8, relative_max_distance=16),
    dict(mask="causal&sliding_window:" + str(2**63 - 1)),
    dict(soft_mask_penalty=1e4), dict(attn_temperature=1e-4), dict(attn_scale=1e4),
    dict(init_std=1.0), dict(rope_base=1e300), dict(norm_eps=1.0), dict(n_layers=2),
]


@pytest.mark.parametrize("changes", ACCEPTED, ids=[str(i) for i in range(len(ACCEPTED))])
def test_values_at_the_bounds_still_construct(changes: dict[str, Any]) -> None:
    ModelConfig(**{**BASE, **changes})
