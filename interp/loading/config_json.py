"""Type checks for the ``config.json`` fields interp's converters read.

A transformers ``config.json`` is JSON written by ``PretrainedConfig.to_json_file``; interp
reads the fields below (see :mod:`interp.loading.families`) and converts them with ``int()`` /
``float()`` / ``bool()``. A value of the wrong JSON type would otherwise fail deep inside a
converter without naming the field (``int('abc')``), or worse be converted silently
(``int(2.5) == 2``, ``bool("false") is True``), so each field is checked here, once, against
the JSON type its meaning needs, and a wrong one is an :class:`InterpError` naming the file and
the field. ``null`` always means "not set" (transformers' default applies). Fields interp does
not read are left to transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interp.errors import InterpError
from interp.rope_scaling import ROPE_TYPES

#: no size or count in a model interp can run comes near this; larger is a corrupt file
MAX_INT = 2**31 - 1

#: sizes and counts: an integer >= 1
POSITIVE_INTS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "d_model", "d_ff", "d_kv",
    "num_layers", "num_heads", "num_decoder_layers", "relative_attention_num_buckets",
    "relative_attention_max_distance", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "decoder_sparse_step",
)
#: counts and ids that may be 0
NON_NEGATIVE_INTS = ("num_experts", "type_vocab_size", "shared_expert_intermediate_size",
                     "sliding_window",  # Qwen2-MoE writes 0 with use_sliding_window false
                     "decoder_start_token_id")
#: epsilons and bases: a finite number > 0
POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")
#: fractions of the head dimension: a number in (0, 1]
FRACTIONS = ("partial_rotary_factor", "rotary_pct")
#: coefficients and clips: a finite number >= 0
NON_NEGATIVE_FLOATS = ("router_aux_loss_coef", "clip_qkv")
BOOLS = (
    "tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "use_sliding_window",
    "use_parallel_residual", "norm_topk_prob", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "scale_decoder_outputs",
)
STRINGS = ("model_type", "hidden_act", "activation_function", "dense_act_fn",
           "feed_forward_proj", "position_embedding_type")
STRING_LISTS = ("architectures", "layer_types")
INT_LISTS = ("mlp_only_layers",)
#: RoPE parameters (transformers 5) or scaling (4.x): an object, its known fields checked too
ROPE_OBJECTS = ("rope_parameters", "rope_scaling")
#: the RoPE types interp implements (:mod:`interp.rope_scaling`)
ROPE_KINDS = ("default", *ROPE_TYPES)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool)
            and math.isfinite(float(x)))


def _int_in(lo: int) -> Callable[[Any], bool]:
    return lambda x: _is_int(x) and lo <= x <= MAX_INT


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {}
for _n in POSITIVE_INTS:
    _RULES[_n] = (_int_in(1), f"an integer from 1 to {MAX_INT}")
for _n in NON_NEGATIVE_INTS:
    _RULES[_n] = (_int_in(0), f"an integer from 0 to {MAX_INT}")
for _n in POSITIVE_FLOATS:
    _RULES[_n] = (lambda x: _is_number(x) and x > 0, "a finite number > 0")
for _n in FRACTIONS:
    _RULES[_n] = (lambda x: _is_number(x) and 0 < x <= 1, "a number in (0, 1]")
for _n in NON_NEGATIVE_FLOATS:
    _RULES[_n] = (lambda x: _is_number(x) and x >= 0, "a finite number >= 0")
for _n in BOOLS:
    _RULES[_n] = (lambda x: isinstance(x, bool), "true or false")
for _n in STRINGS:
    _RULES[_n] = (lambda x: isinstance(x, str), "a string")
for _n in STRING_LISTS:
    _RULES[_n] = (lambda x: isinstance(x, list) and all(isinstance(v, str) for v in x),
                  "a list of strings")
for _n in INT_LISTS:
    _RULES[_n] = (lambda x: isinstance(x, list) and all(_is_int(v) and 0 <= v <= MAX_INT
                                                        for v in x),
                  "a list of non-negative integers")
for _n in ROPE_OBJECTS:
    _RULES[_n] = (lambda x: isinstance(x, dict), "an object")
#: fields inside rope_parameters / rope_scaling
_ROPE_RULES = {k: _RULES[k] for k in ("rope_theta", "partial_rotary_factor")}
_ROPE_RULES["rope_type"] = _ROPE_RULES["type"] = (lambda x: isinstance(x, str), "a string")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: Path, field: str, value: Any, want: str) -> InterpError:
    return InterpError(f"{str(path)!r} field {field!r} is {_short(value)}; it must be {want}: "
                       "correct the value (or remove it to use the default).")


def check_config_fields(raw: dict[str, Any], path: Path) -> None:
    """Raise if a field interp reads has a value of the wrong type or out of range."""
    for field, value in raw.items():
        rule = _RULES.get(field)
        if rule is None or value is None:
            continue
        ok, want = rule
        if not ok(value):
            raise _fail(path, field, value, want)
        if field in ROPE_OBJECTS:
            # one dict, or one per layer type (Gemma 3: {"full_attention": {...}, ...})
            nested = [(f"{field}.{k}", v) for k, v in value.items() if isinstance(v, dict)]
            for name, params in nested or [(field, value)]:
                _check_rope(path, name, params)


def _check_rope(path: Path, field: str, params: dict[str, Any]) -> None:
    """The known fields of one RoPE dict, and its type among those interp implements."""
    for sub, sub_value in params.items():
        sub_rule = _ROPE_RULES.get(sub)
        if sub_rule is not None and sub_value is not None and not sub_rule[0](sub_value):
            raise _fail(path, f"{field}.{sub}", sub_value, sub_rule[1])
    kind = params.get("rope_type", params.get("type"))
    if kind is not None and kind not in ROPE_KINDS:
        raise InterpError(f"{str(path)!r} field {field!r} has rope_type {_short(kind)}; "
                          f"supported: {', '.join(ROPE_KINDS)}.")
