"""Bad input gets an InterpError (a ValueError) whose one-line message names the problem."""

from __future__ import annotations

import pytest
import torch

from interp import InterpError, KVCache, ModelConfig, build_model

BASE = dict(n_layers=1, d_model=16, n_heads=2, d_vocab=20, n_ctx=8)


def make(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw}))


GOOD = torch.tensor([[1, 2, 3]])


def raises(match: str):
    return pytest.raises(InterpError, match=match)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_bad_tokens(arch: str) -> None:
    model = make(architecture=arch)
    with raises(r"outside the vocabulary 0\.\.19"):
        model(torch.tensor([[1, 20]]))
    with raises(r"id -1, outside the vocabulary"):
        model(torch.tensor([[1, -1]]))
    with raises(r"integer token ids.*dtype torch.float32"):
        model(torch.tensor([[1.0, 2.0]]))
    with raises("integer token ids"):
        model(torch.tensor([[True, False]]))
    with raises(r"shape \[batch, pos\].*\(1, 2, 3\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with raises(r"shape \[batch, pos\]"):
        model(torch.tensor(3))
    with raises("empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with raises("empty"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with raises("torch.Tensor of token ids, got list"):
        model([[1, 2]])
    with raises("torch.Tensor of token ids, got str"):
        model("hello")
    assert model(torch.tensor([1, 2, 3])).shape == (1, 3, 20)  # a 1-D sequence is one batch row


def test_too_long_for_learned_positions() -> None:
    model = make(positional="learned")
    with raises(r"Sequence length 9 exceeds n_ctx=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(1)
    model(torch.zeros(1, 6, dtype=torch.long), past_kv=cache)
    with raises(r"Sequence length 9 exceeds n_ctx=8"):
        model(torch.zeros(1, 3, dtype=torch.long), past_kv=cache)
    with raises("n_ctx"):
        model.generate(torch.zeros(1, 6, dtype=torch.long), max_new_tokens=5)
    # positions without a table have no hard limit
    for positional in ("rope", "alibi", "sinusoidal", "none", "relative"):
        assert make(positional=positional)(torch.zeros(1, 12, dtype=torch.long)).shape == (
            1,
            12,
            20,
        )


def test_bad_attention_mask() -> None:
    model = make()
    with raises(r"attention_mask must be a tensor of shape \(1, 3\).*got \(1, 4\)"):
        model(GOOD, attention_mask=torch.ones(1, 4))
    with raises(r"attention_mask must be a tensor of shape \(1, 3\).*got list"):
        model(GOOD, attention_mask=[[1, 1, 1]])
    with raises(r"attention_mask.*got \(3,\)"):
        model(GOOD, attention_mask=torch.ones(3))


def test_bad_token_type_ids_and_labels() -> None:
    model = make(architecture="encoder", n_token_types=2)
    with raises("token_type_ids"):
        model(GOOD, token_type_ids=torch.tensor([[0, 1, 2]]))
    with raises("token_type_ids"):
        model(GOOD, token_type_ids=torch.tensor([[0, 1]]))
    with raises("no token types"):
        make()(GOOD, token_type_ids=torch.tensor([[0, 0, 0]]))
    with raises("labels="):
        model(GOOD, return_type="loss")
    with raises(r"labels"):
        model(GOOD, return_type="loss", labels=torch.tensor([[1, 2]]))
    with raises(r"labels"):
        model(GOOD, return_type="loss", labels=torch.tensor([[1, 2, 25]]))
    assert torch.isfinite(model(GOOD, return_type="loss", labels=torch.tensor([[-100, 2, -100]])))


def test_bad_call_arguments() -> None:
    model = make()
    with raises("return_type"):
        model(GOOD, return_type="probs")
    with raises("at least two tokens"):
        model(torch.tensor([[1]]), return_type="loss")
    with raises("residual="):
        model(GOOD, start_at_layer=0)
    with raises("max_new_tokens"):
        model.generate(GOOD, max_new_tokens=-1)
    with raises("no tokenizer"):
        model.to_tokens("hi")
    with raises("head gates must have shape"):
        model.set_head_gates(torch.ones(3, 2))
    with raises("no mixture of experts"):
        model.set_expert_mask(0, torch.ones(2, dtype=torch.bool))
    with raises("temperature must be > 0"):
        with model.override_attention(temperature=0):
            pass
    with raises("soft_mask_penalty must be >= 0"):
        with model.override_attention(soft_mask_penalty=-1.0):
            pass
    with pytest.raises(ValueError, match="Unknown mask"):
        with model.override_attention(mask="diagonal"):
            pass
    for bad in (
        dict(temperature=float("nan")),
        dict(temperature=True),
        dict(soft_mask_penalty=float("nan")),
        dict(mask=3),
    ):
        with raises(next(iter(bad)) if "mask" not in bad else "mask must be"):
            with model.override_attention(**bad):
                pass
    linear = make(attn_kernel="linear")
    for kw in (dict(temperature=2.0), dict(soft_mask_penalty=1.0), dict(mask="prefix_lm:2")):
        with raises("Linear attention"):
            with linear.override_attention(**kw):
                pass
    with linear.override_attention(temperature=1.0, soft_mask_penalty=None, mask="causal"):
        linear(GOOD)
    with raises("Unknown stack 'encoder'; this model's stacks: blocks"):
        model.set_head_gates(torch.ones(1, 2), stack="encoder")
    with raises("has no cross-attention"):
        model.set_head_gates(torch.ones(1, 2), stack="blocks.cross")
    moe = make(n_experts=3, experts_per_token=2)
    with raises("layer must be an integer in 0..0"):
        moe.set_expert_mask(1, torch.ones(3, dtype=torch.bool))
    with raises("Unknown stack"):
        moe.set_expert_mask(0, None, stack="moe")
    with raises("keeping at least top_k=2"):
        moe.set_expert_mask(0, torch.tensor([True, False, False]))
    with raises(r"bool \[3\]"):
        moe.set_expert_mask(0, torch.tensor([True, True]))
    enc = make(architecture="encoder")
    with raises("needs a decoder"):
        enc.generate(GOOD, max_new_tokens=2)
    bare = make(architecture="encoder", has_unembed=False)
    for asked in ("logits", "loss", "both"):
        with raises("no unembedding"):
            bare(GOOD, return_type=asked, labels=GOOD)
    assert bare(GOOD, return_type="hidden").shape == (1, 3, 16)


def test_encoder_decoder_bad_input() -> None:
    model = make(architecture="encoder_decoder")
    with raises("decoder_input"):
        model(GOOD)
    with raises(r"decoder_input contain id 20"):
        model(GOOD, torch.tensor([[0, 20]]))
    with raises(r"input tokens must hold integer"):
        model(GOOD.float(), GOOD)
    with raises("attention_mask"):
        model(GOOD, GOOD, attention_mask=torch.ones(1, 2))
    with raises("Sequence length"):
        model(torch.zeros(1, 9, dtype=torch.long), GOOD)
    with raises("labels must be ids in 0..19"):
        model(GOOD, labels=torch.tensor([[1, 2, 20]]), return_type="loss")
    with raises("labels must be integer ids"):
        model(GOOD, GOOD, labels=torch.tensor([[1, 2]]), return_type="loss")
    assert torch.isfinite(model(GOOD, labels=torch.tensor([[1, 2, -100]]), return_type="loss"))


def test_bad_model_construction() -> None:
    from interp import HookedEncoderDecoder, HookedTransformer

    with raises("needs an interp.ModelConfig"):
        HookedTransformer({"n_layers": 1})
    with raises("HookedEncoderDecoder"):
        HookedTransformer(ModelConfig(**BASE, architecture="encoder_decoder"))
    with raises("architecture='encoder_decoder'"):
        HookedEncoderDecoder(ModelConfig(**BASE))


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_default_return_type_follows_the_unembedding(arch: str) -> None:
    """A model without an unembedding answers with its final hidden states by default (as
    transformers' BertModel); one with an unembedding answers with logits. run_with_cache
    follows the same default."""
    args = (GOOD, GOOD) if arch == "encoder_decoder" else (GOOD,)
    bare = make(architecture=arch, has_unembed=False)
    hidden = bare(*args, return_type="hidden")
    assert hidden.shape == (1, 3, 16)
    torch.testing.assert_close(bare(*args), hidden)
    out, cache = bare.run_with_cache(*args)
    torch.testing.assert_close(out, hidden)
    assert len(cache) > 0
    torch.testing.assert_close(bare(*args, return_type="auto"), hidden)
    with raises("no unembedding"):
        bare(*args, return_type="logits")
    with raises("no unembedding"):
        bare.run_with_cache(*args, return_type="logits")
    full = make(architecture=arch)
    torch.testing.assert_close(full(*args), full(*args, return_type="logits"))
    assert full(*args).shape == (1, 3, 20)
    assert full.run_with_cache(*args)[0].shape == (1, 3, 20)


def test_generate_refuses_a_decoder_without_unembedding() -> None:
    """generate needs logits: it must not sample from hidden states now that they are a bare
    model's default output."""
    with raises("no unembedding"):
        make(has_unembed=False).generate(GOOD, max_new_tokens=1)
