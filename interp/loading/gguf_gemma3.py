"""Gemma 3 GGUF files (``general.architecture = "gemma3"``): metadata to a ``gemma3_text``
config, tensor names to transformers', and the two conventions llama.cpp's converter changes.

The GGUF is presented to interp as the Hugging Face checkpoint it was converted from, so the
``gemma3_text`` family (:mod:`interp.loading.families`) does the rest, as for HF folders:

- **Norm weights.** Gemma's RMSNorm scales by ``1 + w``; llama.cpp's ``Gemma3Model`` stores
  ``w + 1`` for every ``*norm.weight`` (q/k norms included) so that its RMSNorm multiplies by
  the stored value. :func:`gemma3_tensor` subtracts the 1 again (as transformers' GGUF loader
  does); a test checks that the 270M file's norms only make sense that way round.
- **No q/k permutation.** Unlike Llama, the Gemma converter leaves ``attn_q``/``attn_k`` rows
  in transformers' order (RoPE halves, not interleaved pairs).
- **What the file does not say.** llama.cpp hard-codes Gemma 3's layer pattern (5 sliding
  layers, then 1 global: ``set_swa_pattern(6)``), the sliding layers' RoPE base (10,000), and
  the attention scale (``1/sqrt(head_dim)``, ``1/sqrt(d_model/n_heads)`` for the 62-layer 27B);
  newer converters may write ``attention.sliding_window_pattern`` and ``rope.freq_base_swa``,
  which are read when present.
- **RoPE scaling.** Gemma 3 4B and larger stretch the global layers' RoPE linearly (factor 8):
  ``rope.scaling.type`` ``linear`` and ``rope.scaling.factor`` map to the ``full_attention``
  entry of ``rope_parameters``; the sliding layers are never scaled. Other kinds are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from interp.loading.gguf_format import STRING, GGUFFile, meta_check, meta_float, meta_int

#: GGUF tensor name pieces -> transformers' Gemma 3 names (per block ``blk.{i}.``)
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

#: llama.cpp's Gemma 3 constants (src/llama-model.cpp) for files that do not state them
SWA_PERIOD = 6
LOCAL_ROPE_BASE = 10000.0
LAYERS_27B = 62


def _layer_types(reader: GGUFFile, a: str, n_layers: int) -> list[str]:
    """Per-layer ``sliding_attention``/``full_attention``: the file's
    ``attention.sliding_window_pattern`` (a period, or one bool per layer, true = sliding) when
    present, else llama.cpp's period of 6 (every 6th layer global)."""
    key = a + "attention.sliding_window_pattern"
    pattern = reader.metadata.get(key)
    if isinstance(pattern, list):
        meta_check(reader, len(pattern) == n_layers and all(isinstance(p, bool) for p in pattern),
                   f"key '{key}' must hold one BOOL per layer ({n_layers})")
        sliding = list(pattern)
    else:
        period = meta_int(reader, key, default=SWA_PERIOD)
        assert period is not None
        sliding = [(i + 1) % period != 0 for i in range(n_layers)]
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _global_rope(reader: GGUFFile, a: str, base: float) -> dict[str, Any]:
    """The ``full_attention`` RoPE entry: plain, or linear scaling as the file states."""
    kind_key, factor_key = a + "rope.scaling.type", a + "rope.scaling.factor"
    kind = reader.metadata.get(kind_key)
    meta_check(reader, kind is None or reader.types[kind_key] == STRING,
               f"key '{kind_key}' must be a STRING")
    factor = 1.0  # absent or 0: none (llama.cpp's reading)
    if reader.metadata.get(factor_key) not in (None, 0, 0.0):
        factor = meta_float(reader, factor_key)
    meta_check(reader, kind in (None, "none", "linear"), f"key '{kind_key}' is {kind!r}; "
               "Gemma 3 GGUF files are read with no or 'linear' RoPE scaling")
    if kind != "linear" or factor == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "factor": factor, "rope_theta": base}


def gemma3_config_dict(reader: GGUFFile, base: dict[str, Any]) -> dict[str, Any]:
    """The transformers ``gemma3_text`` config of a Gemma 3 GGUF file. ``base`` holds the keys
    every architecture shares, already read and checked (sizes, heads, vocabulary, eps)."""
    a = "gemma3."
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2 only
        meta_check(reader, a + key not in reader.metadata,
                   f"key '{a}{key}' is set; logit soft-capping is not supported for Gemma 3")
    n_layers, d, n_heads = base["num_hidden_layers"], base["hidden_size"], base[
        "num_attention_heads"]
    window = meta_int(reader, a + "attention.sliding_window")
    meta_check(reader, window is not None, f"key '{a}attention.sliding_window' is missing; "
               "Gemma 3's local layers need it")
    global_base = meta_float(reader, a + "rope.freq_base", default=1_000_000.0)
    local_base = meta_float(reader, a + "rope.freq_base_swa", default=LOCAL_ROPE_BASE)
    scalar = d // n_heads if n_layers == LAYERS_27B else base["head_dim"]
    return {
        **base,
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": window,
        "layer_types": _layer_types(reader, a, n_layers),
        "query_pre_attn_scalar": scalar,
        "rope_theta": global_base,
        "rope_local_base_freq": local_base,
        "rope_parameters": {
            "full_attention": _global_rope(reader, a, global_base),
            "sliding_attention": {"rope_type": "default", "rope_theta": local_base},
        },
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def gemma3_tensor(hf_name: str, weight: torch.Tensor) -> torch.Tensor:
    """A dequantised Gemma 3 tensor in transformers' convention: stored norms are ``1 + w``."""
    if hf_name.endswith("norm.weight"):
        return weight - 1.0
    return weight
