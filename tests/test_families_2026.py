"""Logit parity with transformers for the 2026 families (issue 20), one row of the README table
per entry of FAMILIES.

Each: a tiny random transformers model built offline (eager attention), weights re-drawn at
unit scale so a wrong layout or a missing soft-cap cannot hide, saved and loaded back with
``interp.load_pretrained``. Logits, every layer's residual (``output_hidden_states``) and every
layer's pattern (``output_attentions``; a sliding layer's is full size with the hidden part
zero) agree within 1e-4 in float32, with no padding and with left padding (non-pad positions).
Sliding-window families also decode with the KV cache past the window exactly as a full
recomputation, and as transformers' own greedy ``generate``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import transformers  # noqa: E402

import interp  # noqa: E402
from interp.errors import InterpError  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
ATOL = 1e-4
V = 101
T = 12
WINDOW = 4  # < T: sliding layers hide keys within every test sequence


def _scale_weights(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: norms ~1 +- 0.1, biases ~0.1, matrices ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm = any(s in name.lower() for s in ("norm", "ln")) and name.endswith("weight")
                p.copy_(float(is_norm) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _make(cls_name: str, cfg_cls: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        return getattr(transformers, cls_name)(getattr(transformers, cfg_cls)(**kw))
    return make


SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64)
GEMMA = dict(SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8,
             query_pre_attn_scalar=12, sliding_window=WINDOW)
LLAMA = dict(SMALL, intermediate_size=48, num_key_value_heads=2)
SLIDING3 = ["sliding_attention", "sliding_attention", "full_attention"]
#: name -> (factory, sliding-window family)
FAMILIES: dict[str, tuple[Callable[[], Any], bool]] = {
    "gemma3_text": (_make("Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA,
                          layer_types=SLIDING3), True),
    "gemma3_text_linear": (_make("Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA,
                                 layer_types=SLIDING3, rope_parameters={
                                     "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                        "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 1e4}}), True),
    "gemma3_multimodal": (_make(
        "Gemma3ForConditionalGeneration", "Gemma3Config",
        text_config={**GEMMA, "layer_types": SLIDING3},
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=V - 1, boi_token_index=V - 3,
        eoi_token_index=V - 2), True),
    "gemma2": (_make("Gemma2ForCausalLM", "Gemma2Config", **GEMMA,
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0), True),
    "gemma": (_make("GemmaForCausalLM", "GemmaConfig", **SMALL, intermediate_size=48,
                    num_key_value_heads=1, head_dim=8), False),
    "qwen3": (_make("Qwen3ForCausalLM", "Qwen3Config", **LLAMA, head_dim=8), False),
    "qwen2_sliding": (_make("Qwen2ForCausalLM", "Qwen2Config", **LLAMA, use_sliding_window=True,
                            sliding_window=WINDOW, max_window_layers=1), True),
    "qwen3_moe": (_make("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **LLAMA, head_dim=8,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        norm_topk_prob=True, mlp_only_layers=[0]), False),
    "olmo2": (_make("Olmo2ForCausalLM", "Olmo2Config", **LLAMA), False),
    "phi3_longrope": (_make("Phi3ForCausalLM", "Phi3Config",
                            **{**LLAMA, "max_position_embeddings": 32},
                            original_max_position_embeddings=8, pad_token_id=0,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.5,
                                             "short_factor": [1.0, 1.5],
                                             "long_factor": [2.0, 3.0]}), False),
    "phi3_sliding": (_make("Phi3ForCausalLM", "Phi3Config", **LLAMA, sliding_window=WINDOW,
                           pad_token_id=0), True),
    "gptj": (_make("GPTJForCausalLM", "GPTJConfig", vocab_size=V, n_embd=32, n_layer=2,
                   n_head=4, n_positions=64, rotary_dim=4), False),
    "bloom": (_make("BloomForCausalLM", "BloomConfig", vocab_size=V, hidden_size=32, n_layer=2,
                    n_head=4), False),
    "bloom_6_heads": (_make("BloomForCausalLM", "BloomConfig", vocab_size=V, hidden_size=48,
                            n_layer=2, n_head=6), False),
    "mpt": (_make("MptForCausalLM", "MptConfig", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                  max_seq_len=64, expansion_ratio=2), False),
    **{f"llama_{kind}": (_make("LlamaForCausalLM", "LlamaConfig", **{
        **LLAMA, "max_position_embeddings": 8 if kind == "dynamic" else 64},
        rope_parameters={"rope_type": kind, "rope_theta": 1e4, **params}), False)
       for kind, params in {
           "linear": {"factor": 4.0},
           "dynamic": {"factor": 2.0},  # T = 12 > 8 positions: the base grows
           "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
           "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
       }.items()},
}


_LOADED: dict[str, tuple[str, Any, Any]] = {}


def _load(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """(name, transformers model, interp model loaded from its saved folder), built once."""
    if name not in _LOADED:
        torch.manual_seed(0)
        hf = FAMILIES[name][0]()
        hf.set_attn_implementation("eager")
        _scale_weights(hf, seed=1)
        hf.eval()
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        _LOADED[name] = (name, hf, interp.load_pretrained(folder))
    return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(n for n, (_, sliding) in FAMILIES.items()
                                              if sliding))
def sliding_family(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """The rows whose layers (some or all) attend within a sliding window."""
    return _load(request.param, tmp_path_factory)


def _tokens(B: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _padding(tokens: torch.Tensor, padding: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(attention mask, real positions): none, or row 0 left-padded by 3 positions."""
    if padding != "left":
        return None, torch.ones(tokens.shape, dtype=torch.bool)
    mask = torch.ones(tokens.shape, dtype=torch.long)
    mask[0, :3] = 0
    return mask, mask.bool()


def max_logit_gap(hf: Any, model: Any, padding: str) -> float:
    """max |logit difference| over non-pad positions (the README table's number)."""
    tokens = _tokens()
    mask, keep = _padding(tokens, padding)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask).logits
        ours = model(tokens, attention_mask=mask)
    return float((ours - ref)[keep].abs().max())


@pytest.mark.parametrize("padding", ["none", "left"])
def test_parity(family: tuple[str, Any, Any], padding: str) -> None:
    name, hf, model = family
    tokens = _tokens()
    mask, keep = _padding(tokens, padding)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True,
                 output_attentions=True)
        logits = model(tokens, attention_mask=mask)  # the default kernel
        logits_eager, cache = model.run_with_cache(
            tokens, attention_mask=mask,
            names_filter=lambda n: n.endswith(("hook_resid_post", "hook_pattern")))
    assert (logits - ref.logits)[keep].abs().max() <= ATOL, name
    assert (logits_eager - ref.logits)[keep].abs().max() <= ATOL, name
    n = model.cfg.n_layers
    for layer in range(n):
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        if layer == n - 1:  # transformers reports the last layer after the final norm
            ours = model.ln_final(ours)
        assert (ours - ref.hidden_states[layer + 1])[keep].abs().max() <= ATOL, layer
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        sel = keep[:, None, :, None].expand_as(pattern)
        assert (pattern - ref.attentions[layer])[sel].abs().max() <= ATOL, layer


def test_sliding_layers_hide_old_keys(sliding_family: tuple[str, Any, Any]) -> None:
    """The per-layer pattern reached the model: sliding layers' patterns are zero past the
    window, global ones are not."""
    _, _, model = sliding_family
    _, cache = model.run_with_cache(_tokens(), names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_pattern"]
        old = torch.ones(T, T, dtype=torch.bool).tril(-WINDOW)  # q - k >= window
        hidden = p[..., old].abs().max()
        # a per-layer window (layer_types), or one on every layer (Phi-3: the stack's mask)
        slides = model.cfg.is_sliding_layer(layer) or not model.cfg.mask.is_causal
        assert (hidden == 0) == slides, layer


def test_kv_cache_past_the_window(sliding_family: tuple[str, Any, Any]) -> None:
    """Decoding with the cache, far past the window, equals full recomputation step by step,
    and greedy generation equals transformers'."""
    _, hf, model = sliding_family
    tokens = _tokens(B=1)
    with torch.no_grad():
        full = model(tokens)
        cache = interp.KVCache(model.cfg.n_layers)
        steps = [model(tokens[:, :2], past_kv=cache)]
        for i in range(2, T):
            steps.append(model(tokens[:, i:i + 1], past_kv=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL
    prompt = tokens[:, :3]
    ours = model.generate(prompt, max_new_tokens=3 * WINDOW)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=3 * WINDOW, do_sample=False,
                          attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, ref)


def test_unknown_rope_scaling_type_is_one_line(tmp_path: Path) -> None:
    """A config.json with an unknown rope_scaling type names the field and the valid types."""
    hf = FAMILIES["gemma"][0]()
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw["rope_scaling"] = {"rope_type": "quantum", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InterpError) as e:
        interp.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "rope_scaling" in msg and "quantum" in msg
    assert "llama3" in msg and "longrope" in msg and "yarn" in msg


def test_unsupported_model_type_is_one_line(tmp_path: Path) -> None:
    hf = FAMILIES["gemma"][0]()
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model_type"] = "falcon_h1"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InterpError) as e:
        interp.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "model_type" in msg and "falcon_h1" in msg and "gemma3_text" in msg


def test_in_memory_model_matches_folder(family: tuple[str, Any, Any]) -> None:
    """``load_pretrained(hf_model)`` (transformers 5's in-memory tensor layout) gives the same
    logits as the saved folder, and leaves the transformers model untouched."""
    _, hf, from_folder = family
    before = {k: v.clone() for k, v in list(hf.state_dict().items())[:3]}
    model = interp.load_pretrained(hf)
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(model(tokens), from_folder(tokens))
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in before.items())


def half_gaps(name: str, dtype: torch.dtype, folder: Path) -> tuple[float, float]:
    """(interp's, transformers') max |logit - the float32 logits| when both run in ``dtype``."""
    torch.manual_seed(0)
    hf = FAMILIES[name][0]()
    hf.set_attn_implementation("eager")
    _scale_weights(hf, seed=1)
    hf.eval().save_pretrained(folder)
    tokens = _tokens()
    with torch.no_grad():
        ref32 = hf(input_ids=tokens).logits
        theirs = hf.to(dtype)(input_ids=tokens).logits.float()
        ours = interp.load_pretrained(folder, dtype=dtype)(tokens).float()
    return float((ours - ref32).abs().max()), float((theirs - ref32).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gemma3_text", "gemma2", "qwen3", "llama_llama3"])
def test_half_precision_tracks_transformers(name: str, dtype: torch.dtype,
                                            tmp_path: Path) -> None:
    """Loaded in half precision (softmax in float32, RMSNorm normalising in float32), interp's
    logits stay as close to the float32 ones as transformers' own half-precision run (within
    3x: interp folds Gemma's ``1 + w`` into the half-precision weight at load)."""
    ours, theirs = half_gaps(name, dtype, tmp_path)
    assert ours <= 3 * theirs + 0.01, (ours, theirs)


def test_legacy_rope_scaling_field(tmp_path: Path) -> None:
    """A 4.x ``config.json`` (``rope_theta`` + ``rope_scaling``, as Llama 3.1 ships) reads the
    same scaling as 5.x ``rope_parameters``."""
    torch.manual_seed(0)
    hf = FAMILIES["llama_llama3"][0]()
    _scale_weights(hf, seed=1)
    hf.eval().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = interp.load_pretrained(tmp_path)
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.rope_type == "llama3"
    with torch.no_grad():
        assert (model(_tokens()) - hf(_tokens()).logits).abs().max() <= ATOL
