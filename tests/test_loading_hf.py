"""Logit parity with transformers, per checkpoint family.

For every family: a tiny random-weight transformers model built offline from a config (eager
attention), saved with ``save_pretrained`` and loaded back with ``interp.load_pretrained``; its
logits, every layer's ``hook_resid_post`` (vs ``output_hidden_states``), ``hook_pattern`` (vs
``output_attentions``) and, for MoE, ``hook_router_logits`` (vs ``output_router_logits``) must
agree within 1e-4 in float32, with and without left/right padding (non-pad positions).
Weights are re-drawn with unit-scale variance so a wrong layout cannot hide under tiny values.
"""

from __future__ import annotations

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


def _scale_weights(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights: norms ~1 +- 0.1, biases ~0.1, matrices ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if (("norm" in name.lower() or "ln" in name.lower())
                               and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _causal(cls_name: str, cfg_cls: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        cfg = getattr(transformers, cfg_cls)(**kw)
        return getattr(transformers, cls_name)(cfg)
    return make


SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
DECODERS: dict[str, Callable[[], Any]] = {
    "gpt2": _causal("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                    n_positions=64),
    "gpt_neox": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL, intermediate_size=64,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5}),
    "gpt_neox_sequential": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL,
                                   intermediate_size=64, use_parallel_residual=False,
                                   tie_word_embeddings=False),
    "llama": _causal("LlamaForCausalLM", "LlamaConfig", **SMALL, intermediate_size=48,
                     num_key_value_heads=2, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", **SMALL, intermediate_size=48,
                       num_key_value_heads=1, sliding_window=4, head_dim=8),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", **SMALL, intermediate_size=48,
                     num_key_value_heads=2),
    "mixtral": _causal("MixtralForCausalLM", "MixtralConfig", **SMALL, intermediate_size=24,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _causal("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **SMALL, intermediate_size=40,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                         mlp_only_layers=[0]),
    "olmoe": _causal("OlmoeForCausalLM", "OlmoeConfig", **SMALL, intermediate_size=16,
                     num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
}
MOE = {"mixtral", "qwen2_moe", "olmoe"}


@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    name = request.param
    torch.manual_seed(0)
    hf = DECODERS[name]()
    hf.set_attn_implementation("eager")
    _scale_weights(hf, seed=1)
    hf.eval()
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf, interp.load_pretrained(folder)


def _masks(B: int, T: int) -> dict[str, torch.Tensor | None]:
    left = torch.ones(B, T, dtype=torch.long)
    left[0, :3] = 0
    right = torch.ones(B, T, dtype=torch.long)
    right[1, -4:] = 0
    return {"none": None, "left": left, "right": right}


HOOKS = ("hook_resid_post", "hook_pattern", "hook_router_logits")


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_decoder_parity(decoder: tuple[str, Any, Any], padding: str) -> None:
    name, hf, model = decoder
    g = torch.Generator().manual_seed(2)
    B, T = 2, 12
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = _masks(B, T)[padding]
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    kw: dict[str, Any] = {"output_router_logits": True} if name in MOE else {}
    if mask is not None:  # each row counts positions from its first real token, as interp
        # (and TransformerLens, and transformers' own generate) do under padding
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True,
                 output_attentions=True, **kw)
        # the default kernel (SDPA where nothing is hooked)
        logits = model(tokens, attention_mask=mask)
        logits_eager, cache = model.run_with_cache(tokens, attention_mask=mask,
                                                   names_filter=lambda n: n.endswith(HOOKS))
    assert (logits - ref.logits)[keep].abs().max() <= ATOL
    assert (logits_eager - ref.logits)[keep].abs().max() <= ATOL
    n = model.cfg.n_layers
    assert len(ref.hidden_states) == n + 1
    for layer in range(n):
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        if layer == n - 1:  # transformers reports the last layer after the final norm
            ours = model.ln_final(ours)
        assert ((ours - ref.hidden_states[layer + 1])[keep].abs().max() <= ATOL
                ), f"layer {layer} resid_post"
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert ((pattern - ref.attentions[layer])[keep[:, None, :, None].expand_as(pattern)]
                .abs().max() <= ATOL)
    if name in MOE:
        moe_layers = [i for i in range(n) if model.cfg.is_moe_layer(i)]
        router = [r for r in ref.router_logits if r is not None]
        assert len(router) == len(moe_layers) >= 1
        for layer, r in zip(moe_layers, router, strict=True):
            ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
            assert (ours - r.view(B, T, -1))[keep].abs().max() <= ATOL


def test_in_memory_model_matches_folder(decoder: tuple[str, Any, Any]) -> None:
    """The in-memory (transformers 5 fused-expert) layout converts to the same weights, and
    the loaded model does not share storage with the transformers model."""
    name, hf, from_folder = decoder
    model = interp.load_pretrained(hf)
    for k, v in from_folder.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    before = next(hf.parameters()).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert torch.equal(next(hf.parameters()), before)


def test_sliding_window_reaches_the_mask(decoder: tuple[str, Any, Any]) -> None:
    name, _, model = decoder
    expected = "causal&sliding_window:4" if name == "mistral" else "causal"
    assert str(model.cfg.mask).replace(" ", "") in (
        expected, str(interp.parse_mask(expected)).replace(" ", ""))


# ---------------------------------------------------------------------------------------------
# encoders (BERT) and encoder-decoders (T5)
# ---------------------------------------------------------------------------------------------
BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)


def _hf(cls_name: str, cfg: Any, seed: int = 1) -> Any:
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(cfg)
    hf.set_attn_implementation("eager")  # also reaches T5's per-stack config copies
    _scale_weights(hf, seed)
    return hf.eval()


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    hf = _hf("BertForMaskedLM", transformers.BertConfig(**BERT))
    folder = tmp_path_factory.mktemp("bert_mlm")
    hf.save_pretrained(folder)
    return hf, interp.load_pretrained(folder)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_bert_mlm_parity(bert_mlm: tuple[Any, Any], padding: str) -> None:
    hf, model = bert_mlm
    assert model.cfg.mlm_head and model.cfg.norm_placement == "post" and not model.cfg.final_norm
    g = torch.Generator().manual_seed(3)
    B, T = 2, 12
    tokens = torch.randint(0, V, (B, T), generator=g)
    types = torch.randint(0, 2, (B, T), generator=g)
    mask = _masks(B, T)[padding]
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as the decoders'
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types, position_ids=pos,
                 output_hidden_states=True, output_attentions=True)
        logits = model(tokens, attention_mask=mask, token_type_ids=types)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, token_type_ids=types,
                                        names_filter=lambda n: n.endswith(HOOKS))
    assert (logits - ref.logits)[keep].abs().max() <= ATOL
    for layer in range(model.cfg.n_layers):
        assert ((cache[f"blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1])[keep]
                .abs().max() <= ATOL)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert ((pattern - ref.attentions[layer])[keep[:, None, :, None].expand_as(pattern)]
                .abs().max() <= ATOL)


def test_bert_model_without_head(tmp_path: Path) -> None:
    """BertModel: no LM head (has_unembed=False), the final states equal last_hidden_state;
    its pooler is dropped on purpose and recorded."""
    hf = _hf("BertModel", transformers.BertConfig(**BERT))
    hf.save_pretrained(tmp_path)
    model = interp.load_pretrained(tmp_path)
    assert (not model.cfg.has_unembed
            and model.cfg.extra["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"])
    tokens = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
        ours = model(tokens, attention_mask=mask, return_type="hidden")
    assert (ours - ref)[mask.bool()].abs().max() <= ATOL
    with pytest.raises(InterpError, match="no unembedding"):
        model(tokens, return_type="logits")


T5_VARIANTS = {
    "t5_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_gated_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(T5_VARIANTS))
def t5(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16,
                                decoder_start_token_id=0, **T5_VARIANTS[request.param])
    hf = _hf("T5ForConditionalGeneration", cfg)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, interp.load_pretrained(folder)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_t5_parity(t5: tuple[Any, Any], padding: str) -> None:
    hf, model = t5
    assert isinstance(model, interp.HookedEncoderDecoder) and model.cfg.attn_scale == 1.0
    g = torch.Generator().manual_seed(4)
    B, S, T = 2, 20, 9  # S > max_distance: the logarithmic buckets are exercised
    src = torch.randint(0, V, (B, S), generator=g)
    dec = torch.randint(0, V, (B, T), generator=g)
    enc_mask = dec_mask = None
    keep = torch.ones(B, T, dtype=torch.bool)
    if padding == "right":
        enc_mask = torch.ones(B, S, dtype=torch.long)
        enc_mask[1, -5:] = 0
        dec_mask = torch.ones(B, T, dtype=torch.long)
        dec_mask[0, -3:] = 0
        keep = dec_mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=enc_mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask, output_hidden_states=True,
                 output_attentions=True)
        logits = model(src, dec, attention_mask=enc_mask, decoder_attention_mask=dec_mask)
        _, cache = model.run_with_cache(src, dec, attention_mask=enc_mask,
                                        decoder_attention_mask=dec_mask,
                                        names_filter=lambda n: n.endswith(HOOKS))
    assert (logits - ref.logits)[keep].abs().max() <= ATOL
    enc_keep = torch.ones(B, S, dtype=torch.bool) if enc_mask is None else enc_mask.bool()
    for layer in range(model.cfg.n_layers):
        ours = cache[f"encoder.{layer}.hook_resid_post"]
        if layer == model.cfg.n_layers - 1:
            ours = model.encoder_final_ln(ours)
        assert (ours - ref.encoder_hidden_states[layer + 1])[enc_keep].abs().max() <= ATOL
        p = cache[f"encoder.{layer}.attn.hook_pattern"]
        assert ((p - ref.encoder_attentions[layer])[enc_keep[:, None, :, None].expand_as(p)]
                .abs().max() <= ATOL)
    for layer in range(model.cfg.n_decoder_layers):
        ours = cache[f"decoder.{layer}.hook_resid_post"]
        if layer == model.cfg.n_decoder_layers - 1:
            ours = model.ln_final(ours)
        assert (ours - ref.decoder_hidden_states[layer + 1])[keep].abs().max() <= ATOL
        for ours_p, ref_p in ((cache[f"decoder.{layer}.attn.hook_pattern"],
                               ref.decoder_attentions[layer]),
                              (cache[f"decoder.{layer}.cross_attn.hook_pattern"],
                               ref.cross_attentions[layer])):
            assert (ours_p - ref_p)[keep[:, None, :, None].expand_as(ours_p)].abs().max() <= ATOL


def test_t5_in_memory_and_generate(t5: tuple[Any, Any]) -> None:
    hf, from_folder = t5
    model = interp.load_pretrained(hf)
    for k, v in from_folder.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    src = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))
    ours = model.generate(src, max_new_tokens=5)  # greedy with the decoder KV cache
    ref = torch.zeros(2, 1, dtype=torch.long)  # greedy by full recomputation in transformers
    with torch.no_grad():
        for _ in range(5):
            nxt = hf(input_ids=src, decoder_input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    assert torch.equal(ours, ref)
