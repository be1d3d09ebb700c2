"""Direct logit attribution is exact (issue 19): the attributions of the full residual
decomposition sum to the true logit difference, with raw weights and after TransformerLens'
weight processing.

TransformerLens' ``cache.logit_attrs`` divides each component by the cached final scale and
dots it with ``model.tokens_to_residual_directions``; TL's own models have the final norm's
gain folded into W_U. interp keeps raw weights by default, so its directions carry the gain
(before the fix the SmolLM2 attribution summed to 0.70 for a true difference of 1.86). A
post-norm encoder (MiniLM) has no unembedding and re-normalises the stream in every block:
``model.direction_attribution`` decomposes the last block's input to its last norm, for a
direction in the final hidden space.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

import interp
from interp.processing import process_weights

LLAMA_STYLE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16, norm="rmsnorm",
                   act="swiglu", n_kv_heads=2, positional="rope", tie_embeddings=True,
                   attn_qkv_bias=False, attn_out_bias=False, mlp_bias=False)
GPT2_STYLE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=16, unembed_bias=True)
TOL = 1e-4


def make(kw: dict) -> interp.HookedTransformer:
    torch.manual_seed(0)
    model = interp.HookedTransformer(interp.ModelConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def tl_dla(model, t: torch.Tensor, good: int, bad: int, **kw) -> tuple[float, float]:
    """(sum of TL's logit_attrs over TL's full decomposition, true logit difference), last
    position of the first sequence."""
    logits, cache = model.run_with_cache(t)
    stack = cache.get_full_resid_decomposition(pos_slice=-1, **kw)
    attrs = cache.logit_attrs(stack, tokens=good, incorrect_tokens=bad, pos_slice=-1)
    attrs, logits = attrs.detach(), logits.detach()
    return float(attrs.sum(0)[0]), float(logits[0, -1, good] - logits[0, -1, bad])


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(abs(b), 1.0)


@pytest.mark.parametrize("expand_neurons", [False, True])
def test_logit_attrs_sum_to_the_logit_difference_on_an_rmsnorm_model(expand_neurons) -> None:
    model, t = make(LLAMA_STYLE), torch.randint(0, 50, (2, 7))
    got, true = tl_dla(model, t, 3, 11, expand_neurons=expand_neurons)
    assert close(got, true), (got, true)
    # the old directions (W_U alone, without the final norm's gain) miss the identity
    _, cache = model.run_with_cache(t)
    scaled = cache.apply_ln_to_stack(cache.get_full_resid_decomposition(pos_slice=-1), -1,
                                     pos_slice=-1)
    old = float((scaled @ (model.W_U[:, 3] - model.W_U[:, 11])).sum(0)[0].detach())
    assert not close(old, true)
    process_weights(model)
    got, true2 = tl_dla(model, t, 3, 11, expand_neurons=expand_neurons)
    assert close(got, true2) and close(true2, true)


@torch.no_grad()
def test_layernorm_model_attribution_is_exact_up_to_the_bias_terms() -> None:
    """A LayerNorm's bias and b_U belong to no component: direction_attribution labels the
    first, and b_U's difference is added by hand (TL's logit_attrs omits both)."""
    model, t = make(GPT2_STYLE), torch.randint(0, 50, (2, 7))
    for processed in (False, True):
        if processed:
            process_weights(model, center_unembed=False)
        logits, cache = model.run_with_cache(t)
        logits = logits.detach()
        d = model.W_U[:, 4] - model.W_U[:, 9]
        attrs, labels = model.direction_attribution(cache, d, expand_neurons=True)
        true = float(logits[0, -1, 4] - logits[0, -1, 9])
        b_U = float(model.b_U[4] - model.b_U[9])
        assert close(float(attrs.sum(0)[0]) + b_U, true)
        assert (labels[-1] == "final_norm_bias") != processed  # folded into b_U by fold_ln
        tl_sum, _ = tl_dla(model, t, 4, 9)
        ln_bias = float(attrs[-1, 0]) if not processed else 0.0
        assert close(tl_sum, float(attrs.sum(0)[0]) - ln_bias)


@pytest.fixture
def minilm():
    return interp.load_pretrained("minilm")


def test_minilm_hidden_direction_attribution_is_exact(minilm) -> None:
    """MiniLM (post-LN BERT, no unembedding): the attributions of a direction in the final
    hidden space sum to the true projection, before and after processing (only value-bias
    folding applies to a post-norm encoder)."""
    model = minilm
    t = model.to_tokens(["The quick brown fox jumps over the lazy dog."])
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    hidden0 = model(t)
    for processed in (False, True):
        if processed:
            process_weights(model)
            assert model.cfg.weight_processing["fold_value_biases"]
            assert not model.cfg.weight_processing["fold_ln"]
            assert model.cfg.normalization_type == "LN"
        hidden, cache = model.run_with_cache(t)
        assert float((hidden - hidden0).abs().max() / hidden0.abs().max()) < TOL
        true = float(hidden[0, -1] @ d)
        for expand in (False, True):
            attrs, labels = model.direction_attribution(cache, d, expand_neurons=expand)
            assert close(float(attrs.sum(0)[0]), true), (processed, expand)
            assert labels[0] == "5_resid_mid" and labels[-1] == "final_norm_bias"


def test_transformer_lens_head_detector_runs(minilm) -> None:
    """head_detector reads cfg.dtype and cfg.device (it failed on cfg.dtype before)."""
    scores = detect_head(minilm, "one two three four five six", "previous_token_head")
    assert scores.shape == (6, 12) and scores.dtype == minilm.cfg.dtype


@pytest.mark.slow
def test_smollm2_logit_attrs_are_exact_raw_and_processed() -> None:
    model = interp.load_pretrained("smollm2-135m")
    t = model.to_tokens("The capital of France is")
    good, bad = model.to_single_token(" Paris"), model.to_single_token(" London")
    raw_logits = model(t)
    got, true = tl_dla(model, t, good, bad, expand_neurons=False)
    assert close(got, true), (got, true)
    _, cache = model.run_with_cache(t)
    # hook_normalized is TL's x / scale, before the gain (it was after: 18.7 apart here)
    x = cache["blocks.3.hook_resid_pre"]
    assert torch.allclose(cache["blocks.3.ln1.hook_normalized"],
                          x / cache["blocks.3.ln1.hook_scale"], atol=1e-5)
    d = model.W_U[:, good] - model.W_U[:, bad]
    attrs, _ = model.direction_attribution(cache, d)
    assert close(float(attrs.sum(0)[0]), true)
    process_weights(model)
    assert model.cfg.normalization_type == "RMSPre" and model.cfg.tie_embeddings is False
    logits = model(t)
    err = (logits.log_softmax(-1) - raw_logits.log_softmax(-1)).abs().max()
    assert float(err / raw_logits.abs().max()) < TOL
    got, true2 = tl_dla(model, t, good, bad, expand_neurons=True)
    assert close(got, true2) and close(true2, true)
