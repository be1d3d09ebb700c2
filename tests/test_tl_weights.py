"""TransformerLens names and semantics on interp models (issue 19): hook_normalized/hook_scale
as TL records them, TL's config fields, stacked weights and factored circuits, weight
processing that leaves logits unchanged, and a checkpoint that reloads processed.

Real-model checks (SmolLM2, MiniLM) of processing and direct logit attribution are in
tests/test_dla.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformer_lens import FactoredMatrix
from transformer_lens.SVDInterpreter import SVDInterpreter

import interp
from interp.errors import InterpError
from interp.loading import save_checkpoint
from interp.processing import process_weights

GPT2_STYLE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16)
LLAMA_STYLE = dict(GPT2_STYLE, norm="rmsnorm", act="swiglu", n_kv_heads=2, positional="rope",
                   tie_embeddings=True, attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False)


def make(kw: dict, seed: int = 0) -> interp.HookedTransformer:
    """A model with every weight (norms and biases too) random, so no fold is trivially 1/0."""
    torch.manual_seed(seed)
    model = interp.HookedTransformer(interp.ModelConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


# ---------------- hook_normalized and hook_scale ----------------
@pytest.mark.parametrize("kw", [GPT2_STYLE, LLAMA_STYLE], ids=["layernorm", "rmsnorm"])
def test_hook_normalized_is_transformer_lens_before_the_gain(kw: dict) -> None:
    model = make(kw)
    _, cache = model.run_with_cache(tokens())
    x = cache["blocks.1.hook_resid_pre"]
    ln = model.blocks[1].ln1
    if kw.get("norm") == "rmsnorm":
        want = x / (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    else:
        xc = x - x.mean(-1, keepdim=True)
        want = xc / (xc.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    got = cache["blocks.1.ln1.hook_normalized"]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, ln(x), atol=1e-2)  # the gain is not in it
    # what TL's apply_ln_to_stack computes from hook_scale is exactly hook_normalized
    assert torch.allclose(cache.apply_ln_to_stack(x[None], layer=1)[0], got, atol=1e-5)
    # TL's logit lens re-applies ln_final itself (the gain included, as TL's unprocessed models)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert torch.allclose(cache.accumulated_resid(apply_ln=True)[-1], model.ln_final(final),
                          atol=1e-5)


def test_editing_hook_normalized_changes_the_output_and_identity_does_not() -> None:
    model, t = make(GPT2_STYLE), tokens()
    base = model(t)
    same = model.run_with_hooks(t, fwd_hooks=[("blocks.0.ln2.hook_normalized", lambda x, hook: x)])
    assert torch.allclose(same, base, atol=1e-5)
    edited = model.run_with_hooks(
        t, fwd_hooks=[("blocks.0.ln2.hook_normalized", lambda x, hook: x * 0.0)])
    assert (edited - base).abs().max() > 1e-2


# ---------------- config fields TL code reads ----------------
def test_config_answers_transformer_lens_names() -> None:
    gpt2, llama = interp.ModelConfig(**GPT2_STYLE), interp.ModelConfig(**LLAMA_STYLE)
    assert (gpt2.dtype, gpt2.device, gpt2.n_devices) == (torch.float32, None, 1)
    assert (gpt2.n_key_value_heads, llama.n_key_value_heads) == (None, 2)
    assert (gpt2.act_fn, llama.act_fn, gpt2.gated_mlp, llama.gated_mlp) == (
        "gelu", "silu", False, True)
    assert (gpt2.positional_embedding_type, llama.positional_embedding_type) == (
        "standard", "rotary")
    assert (gpt2.normalization_type, llama.normalization_type) == ("LN", "RMS")
    assert (gpt2.final_rms, llama.final_rms, gpt2.eps) == (False, True, 1e-5)
    assert (gpt2.model_name, gpt2.original_architecture, gpt2.tokenizer_prepends_bos) == (
        "custom", None, None)
    assert (gpt2.attn_types, gpt2.use_local_attn, gpt2.rotary_dim, llama.rotary_dim) == (
        None, False, None, 8)
    local = interp.ModelConfig(**GPT2_STYLE, mask="causal&sliding_window:4")
    assert (local.use_local_attn, local.window_size, local.attn_types) == (
        True, 4, ["local", "local"])
    # TL's count: attention and FFN weight matrices only (GQA: its real K/V; gated: 3 matrices)
    assert gpt2.n_params == 2 * (4 * 32 * 32 + 2 * 32 * 128)
    assert llama.n_params == 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 128)
    assert gpt2.d_vocab_out == 50 and gpt2.parallel_attn_mlp is False
    hf = interp.ModelConfig(**GPT2_STYLE, extra={"hf_model_type": "llama", "builtin": "x"})
    assert (hf.original_architecture, hf.model_name) == ("LlamaForCausalLM", "x")


def test_config_dtype_and_device_follow_the_model() -> None:
    model = make(GPT2_STYLE).to(torch.float64)
    assert model.cfg.dtype == torch.float64 and model.cfg.device == "cpu"
    assert all(b.cfg is model.cfg for b in model.blocks)
    assert "dtype" not in model.cfg.to_dict()["extra"]  # placement is not saved


# ---------------- stacked weights ----------------
def test_stacked_weights_have_transformer_lens_shapes() -> None:
    model = make(LLAMA_STYLE)
    L, H, D, dh, M = 2, 4, 32, 8, 128
    shapes = {"W_Q": (L, H, D, dh), "W_K": (L, H, D, dh), "W_V": (L, H, D, dh),
              "W_O": (L, H, dh, D), "b_Q": (L, H, dh), "b_K": (L, H, dh), "b_V": (L, H, dh),
              "b_O": (L, D), "W_in": (L, D, M), "W_gate": (L, D, M), "W_out": (L, M, D),
              "b_in": (L, M), "b_out": (L, D), "W_E": (50, D), "W_U": (D, 50), "b_U": (50,),
              "_W_K": (L, 2, D, dh), "_W_V": (L, 2, D, dh)}
    for name, shape in shapes.items():
        assert tuple(getattr(model, name).shape) == shape, name
    assert torch.equal(model.b_U, torch.zeros(50))  # no bias: zeros, as TL
    # GQA: query head h reads kv head h // 2
    assert torch.equal(model.W_K[1, 3], model.blocks[1].attn.W_K[1])
    assert torch.equal(model.W_in[0], model.blocks[0].mlp.W_in)
    assert isinstance(model.QK, FactoredMatrix) and isinstance(model.OV, FactoredMatrix)
    assert torch.allclose(model.OV.AB[1, 2], model.W_V[1, 2] @ model.W_O[1, 2])
    assert torch.allclose(model.QK.AB[0, 1], model.W_Q[0, 1] @ model.W_K[0, 1].T)
    with pytest.raises(InterpError, match="not a gated FFN"):
        _ = make(GPT2_STYLE).W_gate
    with pytest.raises(InterpError, match="W_pos"):
        _ = model.W_pos
    assert make(GPT2_STYLE).W_pos.shape == (16, D)


def test_tl_parameters_feed_svd_interpreter() -> None:
    model = make(dict(GPT2_STYLE, n_kv_heads=2))
    params = model.tl_parameters()
    assert params["blocks.1.attn.W_V"].shape == (4, 32, 8)  # per query head, as TL's GQA
    assert params["blocks.1.attn._W_V"].shape == (2, 32, 8)
    assert torch.equal(params["blocks.0.ln2.w"], model.blocks[0].ln2.w)
    svd = SVDInterpreter(model)
    ov = svd.get_singular_vectors("OV", layer_index=1, head_index=3, num_vectors=2)
    w_in = svd.get_singular_vectors("w_in", layer_index=0, num_vectors=2)
    assert ov.shape == (50, 1, 2) and w_in.shape == (50, 1, 2)
    process_weights(model)  # folded: no ln2.w any more, and SVDInterpreter still reads W_in
    assert "blocks.0.ln2.w" not in model.tl_parameters()
    assert svd.get_singular_vectors("w_in", layer_index=0, num_vectors=2).shape == (50, 1, 2)


# ---------------- weight processing ----------------
PROCESS_CASES = {
    "gpt2": (GPT2_STYLE, True),
    "llama_gqa_rope": (LLAMA_STYLE, False),
    "parallel_tied": (dict(GPT2_STYLE, parallel_attn_mlp=True, tie_embeddings=True), True),
    "biases_only_qkv": (dict(GPT2_STYLE, attn_out_bias=False, mlp_bias=False), True),
    "moe_rms": (dict(LLAMA_STYLE, n_kv_heads=4, n_experts=3, experts_per_token=2), False),
}


@pytest.mark.parametrize("name", list(PROCESS_CASES))
def test_processing_leaves_logits_unchanged_and_reloads(name: str, tmp_path) -> None:
    kw, refactor = PROCESS_CASES[name]
    model, t = make(kw), tokens()
    raw = model(t)
    process_weights(model, center_unembed=False, refactor_factored_attn_matrices=refactor)
    out = model(t)
    assert rel_err(out, raw) < 1e-4
    norm = "LNPre" if kw.get("norm", "layernorm") == "layernorm" else "RMSPre"
    assert model.cfg.normalization_type == norm and not hasattr(model.blocks[0].ln1, "w")
    process_weights(model)  # center_unembed: logits move by one constant per position
    assert rel_err(model(t).log_softmax(-1), raw.log_softmax(-1)) < 1e-4
    assert model.cfg.weight_processing["center_unembed"]
    path = tmp_path / "processed.pt"
    save_checkpoint(model, path)
    again = interp.load_pretrained(path)
    assert again.cfg.weight_processing == model.cfg.weight_processing
    assert torch.allclose(again(t), model(t), atol=1e-5)


def test_processing_does_what_transformer_lens_defines() -> None:
    model = make(GPT2_STYLE)
    process_weights(model, center_unembed=False)
    for W in (model.W_E, model.W_pos, model.W_O, model.W_out):  # writers centred on d_model
        assert W.mean(-1).abs().max() < 1e-5
    for W in (model.W_Q, model.W_K, model.W_V):  # readers of a centred input: centred too
        assert W.mean(-2).abs().max() < 1e-5
    assert model.b_V.abs().max() == 0  # value biases folded into b_O
    assert model.W_E.data_ptr() != model.unembed.W_U.data_ptr()
    process_weights(model, refactor_factored_attn_matrices=True)
    W_O = model.W_O[0, 1]  # [d_head, d_model]: a rotation after refactoring
    assert torch.allclose(W_O @ W_O.T, torch.eye(8), atol=1e-4)


def test_refactor_refuses_rope_and_processing_refuses_other_models() -> None:
    with pytest.raises(InterpError, match="RoPE"):
        process_weights(make(LLAMA_STYLE), refactor_factored_attn_matrices=True)
    with pytest.raises(InterpError, match="HookedTransformer"):
        process_weights(object())


def test_load_pretrained_processing_options(tmp_path) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(interp.ModelConfig(**GPT2_STYLE).to_dict()))
    raw = interp.load_pretrained(path, seed=3)
    assert raw.cfg.weight_processing == {} and raw.cfg.normalization_type == "LN"
    tl = interp.load_pretrained(path, seed=3, process_weights=True)
    assert tl.cfg.weight_processing == {
        "fold_ln": True, "center_writing_weights": True, "center_unembed": True,
        "fold_value_biases": True, "refactor_factored_attn_matrices": False}
    some = interp.load_pretrained(path, seed=3, center_unembed=False)  # as TL: others default
    assert some.cfg.weight_processing["fold_ln"] and not some.cfg.weight_processing[
        "center_unembed"]
    none = interp.load_pretrained_no_processing(path, seed=3, fold_ln=True)
    assert none.cfg.weight_processing == {}
    t = tokens()
    assert rel_err(some(t), raw(t)) < 1e-4
    with pytest.raises(InterpError, match="fold_ln must be True or False"):
        interp.load_pretrained(path, fold_ln="yes")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_processing_a_transformers_model_matches_transformers(family: str) -> None:
    hf = _hf_model(family)
    t = tokens()
    want = hf(t).logits
    model = interp.load_pretrained(hf, process_weights=True, center_unembed=False)
    assert model.cfg.normalization_type in ("LNPre", "RMSPre")
    assert rel_err(model(t), want) < 1e-4


def _hf_model(family: str):
    """A tiny random transformers model whose norms are not 1 (so every fold matters)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    else:  # RMSNorm, GQA, SwiGLU, RoPE, tied embeddings
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=50, max_position_embeddings=32,
            tie_word_embeddings=True))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "ln" in n or "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return hf.eval()


@pytest.mark.parametrize(("family", "n_shared"), [("gpt2", 38), ("llama", 43)])
def test_same_numbers_as_transformer_lens_itself(family: str, n_shared: int, tmp_path) -> None:
    """A random GPT-2 / Llama loaded by interp and by TransformerLens 4's TransformerBridge
    (offline, from the same folder): logits and every shared hook agree, with raw weights and
    with TL's processing (``enable_compatibility_mode``: TL's fold_ln / centring / value-bias
    defaults) against ``process_weights=True``. Masked attention scores are -inf in TL's
    processed mode and finfo.min in ours: compared where both are finite."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    tok = interp.load_pretrained("minilm").tokenizer  # any tokenizer: ids are given directly
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf, tokenizer=tok,
                                                 device="cpu")
    t = tokens()
    for processed in (False, True):
        if processed:
            bridge.enable_compatibility_mode()
        tl_logits, tl_cache = bridge.run_with_cache(t)
        model = interp.load_pretrained(tmp_path, process_weights=processed)
        logits, cache = model.run_with_cache(t)
        assert rel_err(logits, tl_logits) < 1e-4
        shared = set(tl_cache.keys()) & set(cache.keys())
        assert len(shared) == n_shared  # every hook name the family has in both
        for name in sorted(shared):
            a, b = tl_cache[name], cache[name]
            keep = torch.isfinite(a) & (b > torch.finfo(b.dtype).min)
            assert a.shape == b.shape and rel_err(b[keep], a[keep]) < 1e-4, (processed, name)


@pytest.mark.slow
def test_smollm2_same_numbers_as_transformer_lens_itself(tmp_path) -> None:
    """SmolLM2-135M in Hugging Face format (transformers' own load of the shipped GGUF, saved as
    a folder: TL reads no GGUF) through TransformerLens 4's TransformerBridge and through
    interp's folder loader: logits and every shared hook agree within 1e-4 (relative), raw
    weights and with TL's processing against ``process_weights=True``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interp.loading import builtin_path

    gguf = builtin_path("smollm2-135m")  # a missing package: one InterpError naming pip
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    config.quantization_config = None  # dequantised: an ordinary float32 checkpoint now
    hf = type(gguf_model)(config).eval()  # transformers will not save a model marked GGUF
    hf.load_state_dict(gguf_model.state_dict())
    del gguf_model
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf, tokenizer=tok,
                                                 device="cpu")
    t = torch.tensor([tok(p)["input_ids"][:6] for p in ("The capital of France is Paris",
                                                         "When Mary and John went to the")])
    for processed in (False, True):
        if processed:
            bridge.enable_compatibility_mode()
        tl_logits, tl_cache = bridge.run_with_cache(t)
        model = interp.load_pretrained(tmp_path, process_weights=processed)
        logits, cache = model.run_with_cache(t)
        assert rel_err(logits, tl_logits) < 1e-4, processed
        shared = set(tl_cache.keys()) & set(cache.keys())
        assert len(shared) >= 30 * 10, len(shared)  # every layer's hooks, not a handful
        for name in sorted(shared):
            a, b = tl_cache[name], cache[name]
            keep = torch.isfinite(a) & (b > torch.finfo(b.dtype).min)
            assert a.shape == b.shape and rel_err(b[keep], a[keep]) < 1e-4, (processed, name)
        del model, cache, tl_cache
