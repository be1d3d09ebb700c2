"""Constructs => runs: every config ``ModelConfig`` accepts builds, runs forward and backward.

Issue 24 ("configs accepted that cannot run"): T5 relative buckets with
``relative_max_distance`` inside the exact range gave negative bucket ids at forward time, an
astronomically large mask parameter an ``OverflowError``, sizes that cannot be allocated a raw
allocator error. The property test draws over the whole field space (positions with their
parameters, norms, activations, MHA/GQA/MQA, MoE, composed and parametrised masks, soft
penalties, the three architectures, parallel residuals, flags and scalars), with small sizes
and, now and then, a value that used to pass construction and fail later (an extreme scalar, a
huge mask parameter, a bool or a string where an int is needed, a size no machine can hold).
Each draw either refuses with a one-line ``ValueError`` at construction, or builds (a size
beyond this machine's memory refuses there, with "this model needs N GB"), runs on a random
batch of up to ``n_ctx`` tokens, and backpropagates a finite loss into the parameters. An
accepted config also holds values of its annotated types (a bool is not an int, mask parameters
included), and T5's bucket ids stay in range and grow with distance (a negative id silently
indexes the table from its end). 400 draws, about a third accepted: ~25 s on one core.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp import ModelConfig, build_model, config_memory, masks
from interp.config import CHOICES
from interp.config_memory import model_bytes, parameter_count, total_memory_bytes
from interp.errors import InterpError
from interp.model import HookedTransformer
from interp.positions import RelativePositionBias

#: scalars far outside any model's range: they used to construct and then overflow float32
EXTREME_SCALARS = [1e300, 1e-300, 10**400, 1e38, 3.5e38, float("inf"), 1e5, 1e-6, 0.0, -1.0]
#: values of the wrong type for an int field (a bool, a float, a string, None)
WRONG_INTS = [True, False, 2.0, 2.5, "abc", "4", None, [2]]
#: sizes no machine can allocate (bytes far beyond any RAM, or beyond int64)
HUGE_SIZES = [10**12, 10**15, 2**63, 10**30]
#: huge and wrongly typed mask parameters (positions are int64)
HOSTILE_MASK_PARAMS = [2**62, 2**63 - 1, 2**63, 10**30, 10**400, True, False, 2.0, "3", None]
LEAVES = ["causal", "bidirectional", "prefix_lm", "sliding_window", "block_sparse", "strided"]

SIZE_FIELDS = ["n_layers", "d_model", "d_vocab", "n_ctx", "d_head", "d_mlp", "d_vocab_out",
               "n_decoder_layers", "n_token_types", "relative_buckets", "n_experts", "d_expert",
               "d_shared_expert", "n_kv_heads", "n_heads", "rotary_dim", "experts_per_token",
               "n_shared_experts"]
SCALAR_FIELDS = ["logit_scale", "rope_base", "norm_eps", "attn_scale", "soft_mask_penalty",
                 "attn_temperature", "moe_aux_loss_coef", "router_z_loss_coef", "init_std"]
FLAGS = ["attn_only", "parallel_attn_mlp", "tie_embeddings", "has_unembed", "mlm_head",
         "embed_norm", "final_norm", "norm_bias", "attn_qkv_bias", "attn_out_bias", "mlp_bias",
         "unembed_bias", "rope_interleaved", "router_renormalize", "shared_expert_gate",
         "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in",
         "use_hook_tokens", "default_prepend_bos"]
FLAGS += ["adaptive_span", "l0_head_gates", "selective_attention"]  # learned masks


def _log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


def _leaf(name: str, param: Any) -> Any:
    """A mask leaf; a parameter masks.py itself refuses gives the plain causal mask."""
    if name in ("causal", "bidirectional"):
        return masks.MASKS[name]()
    try:
        return masks.MASKS[name](param)
    except ValueError:
        return masks.causal()


@st.composite
def mask_specs(draw: Any, depth: int = 2) -> Any:
    """A MaskSpec tree: parametrised leaves (parameters 0..6) combined with &, | and ~."""
    kind = draw(st.sampled_from(["leaf", "leaf", "and", "or", "not"])) if depth else "leaf"
    if kind == "leaf":
        return _leaf(draw(st.sampled_from(LEAVES)), draw(st.integers(0, 6)))
    a = draw(mask_specs(depth - 1))
    if kind == "not":
        return ~a
    b = draw(mask_specs(depth - 1))
    return a & b if kind == "and" else a | b


def _hostile_mask() -> st.SearchStrategy[Any]:
    """A mask with a huge or wrongly typed parameter, as a spec, a dict or a string."""
    leaf = st.builds(_leaf, st.sampled_from(LEAVES[2:]), st.sampled_from(HOSTILE_MASK_PARAMS))
    text = st.builds("{}{}:{}".format, st.sampled_from(["", "causal&"]),
                     st.sampled_from(LEAVES[2:]),
                     st.sampled_from(["abc", "0", "-2", "1.5", str(2**63), str(10**30)]))
    as_dict = st.builds(lambda n, p: {"name": n, "args": [p]}, st.sampled_from(LEAVES[2:]),
                        st.sampled_from(HOSTILE_MASK_PARAMS))
    deep = st.sampled_from(["&".join(["causal"] * 2000), _nested_not(2000)])
    return st.one_of(leaf, leaf.map(lambda m: masks.causal() & m), text, as_dict, deep)


def _nested_not(depth: int) -> dict[str, Any]:
    """A serialised mask ``~~...~causal`` nested ``depth`` deep (past Python's recursion)."""
    d: dict[str, Any] = {"name": "causal"}
    for _ in range(depth):
        d = {"op": "not", "a": d}
    return d


def _hostile(name: str) -> st.SearchStrategy[Any]:
    """A value for field ``name`` that used to pass construction and fail later, or that is
    of the wrong type."""
    if name == "mask":
        return _hostile_mask()
    if name == "relative_max_distance":
        return st.sampled_from([*WRONG_INTS, 1, 2, 2**62, 2**63, 10**30, 10**400])
    if name in SIZE_FIELDS:
        return st.sampled_from(WRONG_INTS + HUGE_SIZES)
    if name in SCALAR_FIELDS:
        return st.sampled_from([*EXTREME_SCALARS, "1", True, None, float("nan")])
    return st.sampled_from([0, 1, "yes", None, 2.5])  # a flag or a choice


def _sizes(draw: Any) -> dict[str, Any]:
    """The sizes, small; derived ones left unset half the time."""
    n_heads = draw(st.sampled_from([1, 2, 3, 4]))
    kw: dict[str, Any] = dict(
        n_layers=draw(st.integers(1, 3)),
        d_model=draw(st.sampled_from([n_heads * 2, n_heads * 4, n_heads * 5, 8, 16])),
        n_heads=n_heads,
        d_vocab=draw(st.integers(1, 40)),
        n_ctx=draw(st.integers(1, 24)),
    )
    optional = {
        "d_head": st.integers(1, 8),
        "d_mlp": st.integers(1, 24),
        "n_kv_heads": st.sampled_from([h for h in (1, 2, 3, 4) if n_heads % h == 0]),
        "d_vocab_out": st.integers(1, 40),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            kw[name] = draw(strategy)
    return kw


def _positions(draw: Any) -> dict[str, Any]:
    """Position scheme and its parameters (RoPE's width and base, T5's buckets)."""
    kw: dict[str, Any] = {"positional": draw(st.sampled_from(CHOICES["positional"]))}
    if kw["positional"] == "rope":
        if draw(st.booleans()):
            kw["rotary_dim"] = draw(st.sampled_from([2, 4, 6]))
        kw["rope_interleaved"] = draw(st.booleans())
        kw["rope_base"] = draw(_log_uniform(1.0, 1e6))
    if kw["positional"] == "relative" or draw(st.integers(0, 9)) == 0:
        buckets = kw["relative_buckets"] = draw(st.integers(1, 40))
        # within the exact range (up to buckets // 2) as often as beyond it
        kw["relative_max_distance"] = draw(st.one_of(st.integers(1, buckets),
                                                     st.integers(1, 200)))
    return kw


def _attention(draw: Any) -> dict[str, Any]:
    """Mask, kernel, q/k norms, soft penalty, temperature and scale."""
    kw: dict[str, Any] = {
        "attn_kernel": draw(st.sampled_from(["auto", "auto", "eager", "sdpa", "linear"])),
        "linear_feature_map": draw(st.sampled_from(CHOICES["linear_feature_map"])),
        "qk_norm": draw(st.sampled_from(["none", "none", "full", "head"])),
    }
    if draw(st.integers(0, 2)):  # a fifth of the masks have a huge or ill-typed parameter
        kw["mask"] = draw(st.one_of(mask_specs(), mask_specs(), mask_specs(), _hostile_mask(),
                                    st.sampled_from(["causal", "bidirectional"])))
    if draw(st.booleans()):
        kw["soft_mask_penalty"] = draw(st.floats(0.0, 50.0))
    if draw(st.booleans()):
        kw["attn_temperature"] = draw(_log_uniform(0.25, 4.0))
    if draw(st.booleans()):
        kw["attn_scale"] = draw(_log_uniform(0.01, 2.0))
    if draw(st.integers(0, 3)) == 0:
        kw["span_ramp"] = draw(st.integers(1, 64))
    return kw


def _moe(draw: Any, n_layers: int) -> dict[str, Any]:
    """Experts: counts, widths, which layers, router, shared experts, loss weights."""
    n_exp = draw(st.integers(1, 4))
    kw: dict[str, Any] = dict(
        n_experts=n_exp,
        experts_per_token=draw(st.integers(1, n_exp)),
        n_shared_experts=draw(st.integers(0, 2)),
        router=draw(st.sampled_from(CHOICES["router"])),
        router_renormalize=draw(st.booleans()),
        moe_aux_loss_coef=draw(_log_uniform(1e-4, 1.0)),
        router_z_loss_coef=draw(_log_uniform(1e-4, 1.0)),
    )
    kw["shared_expert_gate"] = bool(kw["n_shared_experts"]) and draw(st.booleans())
    if draw(st.booleans()):
        kw["d_expert"] = draw(st.integers(1, 16))
    if draw(st.booleans()):
        kw["d_shared_expert"] = draw(st.integers(1, 16))
    if draw(st.booleans()):
        kw["moe_layers"] = tuple(draw(st.sets(st.integers(0, n_layers - 1), min_size=1)))
    return kw


def _variants(draw: Any, n_layers: int) -> dict[str, Any]:
    """Per-layer attention, RoPE scaling, soft-caps and embedding scale (issue 20)."""
    kw: dict[str, Any] = {}
    if draw(st.booleans()):
        kw["layer_types"] = tuple(draw(st.lists(st.sampled_from(["global", "sliding"]),
                                                min_size=n_layers, max_size=n_layers)))
        kw["sliding_window"] = draw(st.integers(1, 6))
        if draw(st.booleans()):
            kw["rope_local_base"] = draw(_log_uniform(10.0, 1e6))
    if draw(st.integers(0, 2)) == 0:
        kind = draw(st.sampled_from(["linear", "dynamic", "yarn", "llama3", "longrope"]))
        params: dict[str, Any] = {"rope_type": kind, "factor": draw(_log_uniform(1.0, 8.0)),
                                  "original_max_position_embeddings": draw(st.integers(2, 16))}
        if kind == "llama3":
            params.update(low_freq_factor=1.0, high_freq_factor=4.0)
        if kind == "longrope":
            half = draw(st.integers(1, 4))
            params.update(long_factor=[2.0] * half, short_factor=[1.0] * half)
        kw["rope_scaling"] = params
    if draw(st.integers(0, 2)) == 0:
        kw["attn_softcap"] = draw(_log_uniform(0.5, 50.0))
    if draw(st.integers(0, 2)) == 0:
        kw["final_softcap"] = draw(_log_uniform(0.5, 50.0))
    if draw(st.integers(0, 2)) == 0:
        kw["embed_scale"] = draw(_log_uniform(0.1, 30.0))
    return kw


def _memory(draw: Any, n_layers: int) -> dict[str, Any]:
    """Memory-augmented attention (issue 22): persistent slots, a kNN store or XL states, on
    every layer or some; sizes small. Combinations memory refuses are refused in one line."""
    kind = draw(st.sampled_from(["persistent", "knn", "xl"]))
    kw: dict[str, Any] = {"memory_kind": kind}
    if draw(st.booleans()):
        kw["memory_layers"] = tuple(draw(st.sets(st.integers(0, n_layers - 1), min_size=1)))
    if kind == "persistent":
        kw["n_memory_slots"] = draw(st.integers(1, 6))
    elif kind == "knn":
        kw["memory_topk"] = draw(st.integers(1, 4))
        kw["memory_size"] = draw(st.integers(4, 64))
        kw["memory_qk_norm"] = draw(st.booleans())
        kw["memory_joint"] = draw(st.booleans())
    else:
        kw["mem_len"] = draw(st.integers(1, 8))
        kw["cmem_len"] = draw(st.integers(0, 4))
        kw["cmem_rate"] = draw(st.integers(1, 3))
    return kw


def _configs(draw: Any) -> dict[str, Any]:
    """Keyword arguments for ``ModelConfig`` over its whole field space (see the module doc):
    a draw from every field's usual range, then, in about a third of the draws, one or two
    fields set to a hostile value."""
    kw = _sizes(draw)
    arch = draw(st.sampled_from(CHOICES["architecture"]))
    kw["architecture"] = arch
    if arch == "encoder_decoder" and draw(st.booleans()):
        kw["n_decoder_layers"] = draw(st.integers(1, 2))
    kw.update(_positions(draw))
    kw.update(_attention(draw))
    if kw["attn_kernel"] == "linear" and draw(st.integers(0, 3)):
        for name in ("mask", "soft_mask_penalty", "attn_temperature"):  # they need scores
            kw.pop(name, None)
        if kw["positional"] in ("alibi", "relative"):
            kw["positional"] = "learned"
    if arch == "encoder_decoder" and draw(st.integers(0, 7)):
        kw.pop("mask", None)  # an encoder-decoder's decoder must stay causal
    for name in FLAGS:  # defaults mostly, so that fewer draws clash
        if draw(st.integers(0, 3)) == 0:
            kw[name] = draw(st.booleans())
    kw["norm"] = draw(st.sampled_from(["layernorm", "layernorm", "rmsnorm", "rmsnorm", "none"]))
    if kw["norm"] == "none" and draw(st.integers(0, 3)):
        kw.update(qk_norm="none", embed_norm=False)
    kw["norm_placement"] = draw(st.sampled_from(CHOICES["norm_placement"]))
    kw["act"] = draw(st.sampled_from(CHOICES["act"]))
    kw["norm_eps"] = draw(_log_uniform(1e-12, 1e-2))
    kw["logit_scale"] = draw(_log_uniform(0.01, 4.0))
    # without any norm, each gated FFN squares the activations' scale at random init, so an
    # init_std above ~0.3 overflows float32 within three layers: a property of the random
    # weights, not of the architecture (trained or loaded weights run), so keep it small there
    kw["init_std"] = draw(_log_uniform(1e-3, 1.0 if kw["norm"] != "none" else 0.1))
    if draw(st.integers(0, 3)) == 0:
        kw["n_token_types"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 2)) == 0 and (arch != "encoder_decoder" or draw(st.booleans())):
        kw.update(_moe(draw, kw["n_layers"]))
    if draw(st.integers(0, 2)) == 0:
        kw.update(_variants(draw, kw["n_layers"]))
    if draw(st.integers(0, 3)) == 0:
        kw.update(_memory(draw, kw["n_layers"]))
    n_hostile = draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2]))
    # the fields of the examples (mask parameters, T5 buckets) weigh more
    fields = [*["mask", "relative_max_distance"] * 4, *SIZE_FIELDS, *SCALAR_FIELDS, *FLAGS]
    for name in set(draw(st.lists(st.sampled_from(fields), min_size=n_hostile,
                                  max_size=n_hostile))):
        kw[name] = draw(_hostile(name))
    return kw


configs = st.composite(_configs)
DRAWERS = (_sizes, _positions, _attention, _moe, _variants, _memory, _configs)


def _batch(cfg: ModelConfig, data: st.DataObject, vocab: int) -> torch.Tensor:
    """Random token ids [batch, pos]: 1-2 sequences of 1..n_ctx tokens (the longest as often as
    not, so that T5's logarithmic buckets are reached), at most 64 (n_ctx is a hard limit only
    for learned positions, and a hostile draw makes it 10**30)."""
    batch = data.draw(st.integers(1, 2), label="batch")
    longest = min(cfg.n_ctx, 64)
    pos = data.draw(st.one_of(st.integers(1, longest), st.just(longest)), label="pos")
    return torch.randint(0, vocab, (batch, pos))


def _forward_loss(model: Any, cfg: ModelConfig, data: st.DataObject) -> torch.Tensor:
    """Run one forward on random inputs; a scalar loss from the output (and the MoE losses)."""
    tokens = _batch(cfg, data, cfg.d_vocab)
    rt = "logits" if cfg.has_unembed else "hidden"
    if cfg.architecture == "encoder_decoder":
        out = model(tokens, _batch(cfg, data, cfg.d_vocab)[:1].expand(len(tokens), -1),
                    return_type=rt)
    else:
        types = None
        if cfg.n_token_types:
            types = torch.randint(0, cfg.n_token_types, tokens.shape)
        out = model(tokens, return_type=rt, token_type_ids=types)
    assert bool(torch.isfinite(out).all()), "non-finite output"
    if cfg.has_unembed:
        target = torch.randint(0, cfg.d_vocab_out, out.shape[:-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), target.flatten())
    else:
        loss = out.float().pow(2).mean()
    moe = model.moe_losses()
    return loss + moe["aux"] + moe["z"]


def _refused(kw: dict[str, Any]) -> ModelConfig | None:
    """The config, or None after checking the refusal is one line (and a ValueError)."""
    try:
        return ModelConfig(**kw)
    except ValueError as e:
        msg = str(e)
        assert msg and "\n" not in msg, msg
        return None


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kw=configs(), data=st.data())
def test_every_accepted_config_runs_forward_and_backward(kw: dict[str, Any],
                                                         data: st.DataObject) -> None:
    cfg = _refused(kw)
    if cfg is None:
        return
    memory = total_memory_bytes()
    needed = parameter_count(cfg) * torch.get_default_dtype().itemsize
    if memory is not None and needed > memory:
        with pytest.raises(InterpError, match=r"this model needs .* GB for its parameters"):
            build_model(cfg)
        return
    _assert_typed(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.param_count() == parameter_count(cfg)  # the estimate is exact
    loss = _forward_loss(model, cfg, data)
    assert bool(torch.isfinite(loss)), f"non-finite loss {loss}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter got a gradient"
    assert all(bool(torch.isfinite(g).all()) for g in grads), "non-finite gradient"
    for module in model.modules():
        if isinstance(module, RelativePositionBias):
            _check_buckets(module)


def _assert_typed(cfg: ModelConfig) -> None:
    """Every field of an accepted config holds a value of its annotated type (a bool is not an
    int, an int past float's range is not a float), mask parameters included."""
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(cfg):
        if f.name not in ("extra", "_derived"):
            value = getattr(cfg, f.name)
            assert _has_type(value, hints[f.name]), f"{f.name}={value!r} is not {hints[f.name]}"
    stack = [cfg.mask]
    while stack:
        mask = stack.pop()
        for f in dataclasses.fields(mask):
            v = getattr(mask, f.name)
            assert isinstance(v, masks.MaskSpec) or _has_type(v, int), f"mask {mask}"
            stack += [v] if isinstance(v, masks.MaskSpec) else []


def _has_type(value: Any, tp: Any) -> bool:
    """``isinstance`` for the annotations ModelConfig uses (Literal, unions, tuple[int, ...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and (
            abs(value) <= sys.float_info.max)
    return tp is type(None) and value is None or tp is not type(None) and isinstance(value, tp)


def _check_buckets(rel: RelativePositionBias) -> None:
    """T5's bucket ids lie in 0..buckets-1 and never decrease with distance in either direction
    (a negative id indexes the table from its end: wrong, silently), at every distance the
    positions allow, not only those of the batch (n_ctx is no limit for relative positions)."""
    distance = torch.cat([torch.arange(4096), torch.tensor([2**20, 2**40, 2**62])])
    for ids in (rel.bucket(-distance), rel.bucket(distance)):  # past keys, future keys
        assert bool((ids >= 0).all() and (ids < rel.n_buckets).all()), ids
        assert bool((ids[2:] >= ids[1:-1]).all()), f"bucket ids fall with distance: {ids}"


def test_strategy_covers_the_whole_field_space() -> None:
    """Every public field of ModelConfig is drawn by :func:`configs`: a new field must be added
    to the strategy, or the property test would not cover it."""
    public = {f.name for f in dataclasses.fields(ModelConfig) if not f.name.startswith("_")}
    drawn = set(FLAGS).union(*(_strings(fn.__code__) for fn in DRAWERS))
    assert not public - drawn - {"extra"}, sorted(public - drawn)


def _strings(code: Any) -> set[str]:
    """The string constants of a function (and of its nested code): the field names it sets,
    keyword names included."""
    out: set[str] = set()
    for k in code.co_consts:
        if isinstance(k, str):
            out.add(k)
        elif isinstance(k, tuple):
            out |= {x for x in k if isinstance(x, str)}
        elif hasattr(k, "co_consts"):
            out |= _strings(k)
    return out


# --- sizes that cannot be allocated: one line before allocating, or from the allocator ---

HUGE = dict(n_layers=1, d_model=64, n_heads=4, d_vocab=10**13, n_ctx=8)  # 2.3 PB of embeddings


@pytest.mark.parametrize("architecture", ["decoder", "encoder_decoder"])
def test_a_model_larger_than_memory_is_refused_before_allocating(architecture: str) -> None:
    if total_memory_bytes() is None:
        pytest.skip("this platform does not report its memory")
    cfg = ModelConfig(**HUGE, architecture=architecture)
    with pytest.raises(InterpError, match=r"^this model needs [\d,.]+ GB for its parameters; "
                                          r"this machine has [\d,.]+ GB\.") as info:
        build_model(cfg)
    assert "\n" not in str(info.value)


def test_an_allocator_failure_becomes_the_same_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the memory is unknown the build goes ahead, and the allocator's own error (a
    RuntimeError here, a MemoryError or a size past int64 elsewhere) is turned into one line."""
    monkeypatch.setattr(config_memory, "total_memory_bytes", lambda: None)
    for size in (10**13, 10**30):  # the allocator refuses; a size past int64
        cfg = ModelConfig(**{**HUGE, "d_vocab": size})
        with pytest.raises(InterpError, match=r"^this model needs .* GB for its parameters"):
            build_model(cfg)


def test_a_build_on_the_meta_device_is_not_refused() -> None:
    """Loaders build on the meta device (no memory) and then assign the checkpoint's tensors."""
    with torch.device("meta"):
        model = build_model(ModelConfig(**HUGE))
    assert model.embed.W_E.shape == (10**13, 64)


def test_other_construction_errors_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only allocation failures become the memory line; a bug stays a bug."""
    def broken(self: Any) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(HookedTransformer, "init_weights", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        build_model(ModelConfig(**{**HUGE, "d_vocab": 8}))


def test_model_bytes_is_what_the_parameters_take() -> None:
    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_vocab=50, n_ctx=8)
    model = build_model(cfg)
    assert model_bytes(cfg) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes(cfg, torch.bfloat16) == model_bytes(cfg) // 2
