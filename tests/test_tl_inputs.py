"""TransformerLens' input side (issue 19): keywords of forward / run_with_cache / generate, the
tokenizer helpers, the KV cache object, and padded batches that give each row what it gives
alone.

The padding check runs per loader family on tiny random-weight transformers models saved and
loaded back offline (gpt2: learned positions, gpt_neox: partial RoPE, llama: RoPE + GQA,
mixtral: MoE, bert: learned positions in an encoder, t5: relative bias in an encoder-decoder):
for left and right padding, every row of a padded batch must equal that row run alone, in the
logits and in every hook, on its real positions, within 1e-4.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import transformers  # noqa: E402

import interp  # noqa: E402
from interp.errors import InterpError  # noqa: E402
from interp.tokenizers import ByteTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
ATOL = 1e-4
V = 64
SMALL = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32)
FAMILIES: dict[str, Any] = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **SMALL, intermediate_size=32, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, intermediate_size=32, num_key_value_heads=2)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, intermediate_size=16, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        **SMALL, intermediate_size=32)),
}
LONE, WIDTH = 5, 9  # a prompt's length alone, and the padded width (no other dim is 9)


def _scaled(hf: Any) -> Any:
    """Unit-scale weights, so a misplaced position cannot hide under tiny values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name.lower() or "ln" in name.lower()) \
                    and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return hf.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    _scaled(FAMILIES[request.param]()).save_pretrained(folder)
    return request.param, interp.load_pretrained(folder)


def _padded(prompt: torch.Tensor, other: torch.Tensor, side: str) -> tuple[Any, Any, slice]:
    """Row 0 = ``prompt`` padded to WIDTH on ``side``; row 1 = ``other`` (full width)."""
    tokens = torch.zeros(2, WIDTH, dtype=torch.long)
    mask = torch.zeros(2, WIDTH, dtype=torch.long)
    real = slice(WIDTH - LONE, WIDTH) if side == "left" else slice(0, LONE)
    tokens[0, real], mask[0, real] = prompt, 1
    tokens[1], mask[1] = other, 1
    return tokens, mask, real


def _row_on_real(x: torch.Tensor, real: slice) -> torch.Tensor:
    """Row 0 of a padded activation with every position axis (size WIDTH) cut to ``real``."""
    x = x[0]
    for dim, size in enumerate(x.shape):
        if size == WIDTH:
            x = x.narrow(dim, real.start, LONE)
    return x


def _assert_rows_alone(batch_cache: Any, lone_cache: Any, real: slice, what: str) -> int:
    """Every hook of row 0 equals the lone run on real positions; returns hooks compared."""
    n = 0
    for name in lone_cache.keys():
        if re.search(r"experts\.\d+\.", name):  # [tokens routed to e, ...]: no batch axis
            continue
        got, want = _row_on_real(batch_cache[name], real), lone_cache[name][0]
        assert got.shape == want.shape, (what, name)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= ATOL, f"{what}: {name} differs by {err:.2e}"
        n += 1
    return n


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(family: Any, side: str) -> None:
    name, model = family
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, V, (LONE,), generator=g)
    tokens, mask, real = _padded(prompt, torch.randint(1, V, (WIDTH,), generator=g), side)
    with torch.no_grad():
        batch_out = model(tokens, attention_mask=mask)
        lone_out = model(prompt[None])
        _, batch_cache = model.run_with_cache(tokens, attention_mask=mask)
        _, lone_cache = model.run_with_cache(prompt[None])
    assert (_row_on_real(batch_out, real) - lone_out[0]).abs().max() <= ATOL, (name, side)
    assert _assert_rows_alone(batch_cache, lone_cache, real, f"{name}-{side}") > 10
    if model.cfg.architecture == "decoder":  # the last real token's prediction, left padding
        last = real.stop - 1
        assert (batch_out[0, last] - lone_out[0, -1]).abs().max() <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_t5_padded_rows_equal_rows_alone(tmp_path: Path, side: str) -> None:
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                num_heads=4, decoder_start_token_id=0)
    _scaled(transformers.T5ForConditionalGeneration(cfg)).save_pretrained(tmp_path)
    model = interp.load_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, V, (LONE,), generator=g)
    tokens, mask, real = _padded(prompt, torch.randint(1, V, (WIDTH,), generator=g), side)
    dec = torch.randint(1, V, (2, 3), generator=g)
    with torch.no_grad():
        out = model(tokens, dec, attention_mask=mask)
        alone = model(prompt[None], dec[:1])
        _, batch_cache = model.run_with_cache(tokens, dec, attention_mask=mask)
        _, lone_cache = model.run_with_cache(prompt[None], dec[:1])
    assert (out[0] - alone[0]).abs().max() <= ATOL
    assert _assert_rows_alone(batch_cache, lone_cache, real, f"t5-{side}") > 10


# ------------------------------------------------------------------ text in, masks built


def _byte_model(**kw: Any) -> interp.HookedTransformer:
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=257, n_ctx=32, **kw)
    return interp.HookedTransformer(cfg, tokenizer=ByteTokenizer()).eval()


@pytest.mark.parametrize("positional", ["learned", "rope"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_list_of_strings_rows_equal_strings_alone(positional: str, side: str) -> None:
    for arch in ("decoder", "encoder"):
        model = _byte_model(positional=positional, architecture=arch)
        texts = ["hi", "a longer text"]
        with torch.no_grad():
            out, cache = model.run_with_cache(texts, padding_side=side, return_type="hidden")
            for i, text in enumerate(texts):
                alone, lone_cache = model.run_with_cache(text, return_type="hidden")
                n = alone.shape[1]
                real = slice(out.shape[1] - n, out.shape[1]) if side == "left" else slice(0, n)
                assert (out[i, real] - alone[0]).abs().max() <= ATOL, (arch, side, text)
                pattern = cache["pattern", 0][i][:, real, :]
                pads = torch.ones(out.shape[1], dtype=torch.bool)
                pads[real] = False
                if pads.any():
                    assert pattern[..., pads].abs().max() == 0  # no attention to padding


def test_generate_left_pads_a_list_and_each_row_continues_alone() -> None:
    model = _byte_model(positional="learned")
    texts = ["hi", "a longer text"]
    both = model.generate(texts, max_new_tokens=4, stop_at_eos=False)
    for text, got in zip(texts, both, strict=True):
        assert got == model.generate(text, max_new_tokens=4, stop_at_eos=False)
    assert isinstance(both, list) and both[0].startswith("hi")


# ------------------------------------------------------------------ forward keywords


def test_forward_keywords() -> None:
    model = _byte_model(positional="rope")
    tokens = model.to_tokens(["abcdef", "xyz"], padding_side="left")
    batch = model.text_batch(["abcdef", "xyz"], padding_side="left")
    mask = batch.attention_mask
    loss = model(tokens, "loss", attention_mask=mask)  # TL's positional return_type
    per = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert per.shape == (2, tokens.shape[1] - 1)
    assert torch.allclose(per.sum() / mask[:, 1:].sum(), loss, atol=1e-5)
    # the same call on the text itself builds the mask, through run_with_hooks too
    assert torch.allclose(model(["abcdef", "xyz"], "loss", padding_side="left"), loss)
    hooked = model.run_with_hooks(["abcdef", "xyz"], return_type="loss", padding_side="left",
                                  fwd_hooks=[("hook_embed", lambda x, hook: x)])
    assert torch.allclose(hooked, loss, atol=1e-6)
    full = model(tokens, attention_mask=mask)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    resid = cache["blocks.1.hook_resid_pre"]
    # TransformerLens' start_at_layer form: residual as input, ids as tokens= (mask, positions)
    tl = model(resid, start_at_layer=1, tokens=tokens, attention_mask=mask)
    assert torch.allclose(tl, full, atol=1e-5)
    mid = model(tokens, attention_mask=mask, stop_at_layer=1)
    assert torch.allclose(mid, resid, atol=1e-6)
    embed, toks, short, am = model.input_to_embed(["abcdef", "xyz"], padding_side="left")
    assert torch.equal(toks, tokens) and short is None and torch.equal(am, mask)
    assert torch.allclose(embed, cache["blocks.0.hook_resid_pre"], atol=1e-6)
    lone, lone_cache = model.run_with_cache("xyz", remove_batch_dim=True)
    assert lone_cache["blocks.0.hook_resid_pre"].ndim == 2
    with pytest.raises(InterpError, match="needs tokens="):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(InterpError, match="padding_side must be"):
        model(tokens, padding_side="middle")


def test_left_padded_ids_without_a_mask_follow_the_tokenizer() -> None:
    """TransformerLens' rule: ids from a tokenizer that pads on the left carry their mask in
    their leading pad ids (here pad = BOS = 256 shares an id, as GPT-2's does)."""
    model = _byte_model(positional="learned")
    tok = model.tokenizer
    tok.pad_token_id = 256
    tokens = model.to_tokens(["ab", "abcdef"], padding_side="left")
    assert tokens[0, :5].tolist() == [256] * 5 and tokens[0, 5] == 97  # 4 pads, then BOS
    with_mask = model(tokens, attention_mask=model.text_batch(["ab", "abcdef"],
                                                               padding_side="left").attention_mask)
    assert not torch.allclose(model(tokens)[0, -1], with_mask[0, -1], atol=1e-3)  # right-padder
    tok.padding_side = "left"
    assert torch.allclose(model(tokens), with_mask, atol=1e-6)
    assert torch.allclose(model(tokens)[0, -1], model("ab")[0, -1], atol=1e-5)
    assert torch.equal(model.generate(tokens, max_new_tokens=3, stop_at_eos=False)[0, -3:],
                       model.generate("ab", max_new_tokens=3, return_type="tokens",
                                      stop_at_eos=False)[0, -3:])


def test_tl_key_value_cache() -> None:
    model = _byte_model(positional="rope", n_kv_heads=2)
    tokens = model.to_tokens("abcdefg")
    full = model(tokens)
    cache = interp.HookedTransformerKeyValueCache.init_cache(model.cfg, model.device, 1)
    first = model(tokens[:, :4], past_kv_cache=cache)
    assert cache.entries[0].past_keys.shape == (1, 4, 2, 8) and cache[1].past_values is not None
    assert cache.previous_attention_mask.shape == (1, 4)
    cache.freeze()
    for _ in range(2):  # a frozen cache is read, never extended
        rest = model(tokens[:, 4:], past_kv_cache=cache)
        assert cache.seq_len == 4
        assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-4)
    cache.unfreeze()
    model(tokens[:, 4:], past_kv_cache=cache)
    assert cache.seq_len == tokens.shape[1]


def test_generate_keywords() -> None:
    model = _byte_model(positional="learned")
    text = model.generate("ab", max_new_tokens=3, stop_at_eos=False)
    assert isinstance(text, str) and text.startswith("ab") and len(text.encode()) >= 2
    ids = model.generate("ab", max_new_tokens=3, return_type="tokens", stop_at_eos=False)
    assert ids.shape == (1, 6) and ids[0, 0] == 256  # BOS, a, b, three new
    assert torch.equal(ids, model.generate("ab", max_new_tokens=3, use_past_kv_cache=False,
                                           return_type="tokens", stop_at_eos=False))
    a = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=5, top_p=0.9,
                       temperature=0.7, freq_penalty=1.0, seed=3, stop_at_eos=False)
    b = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=5, top_p=0.9,
                       temperature=0.7, freq_penalty=1.0, seed=3, stop_at_eos=False)
    assert torch.equal(a, b) and a.shape == (1, 11)
    greedy_next = int(model(ids)[0, -1].argmax())
    stopped = model.generate(ids, max_new_tokens=5, eos_token_id=greedy_next)
    assert stopped.shape == (1, 7) and stopped[0, -1] == greedy_next
    with pytest.raises(InterpError, match="top_p"):
        model.generate(ids, top_p=1.5)
    with pytest.raises(InterpError, match="return_type"):
        model.generate(ids, return_type="embeds")


def test_tokenizer_helpers() -> None:
    model = _byte_model(positional="learned")
    assert model.to_str_tokens(["ab", "c"]) == [["<bos>", "a", "b"], ["<bos>", "c"]]
    two = model.to_tokens(["ab", "cd"])
    assert model.to_str_tokens(two) == [["<bos>", "a", "b"], ["<bos>", "c", "d"]]
    assert model.to_str_tokens(two[:1]) == ["<bos>", "a", "b"]  # one row: flat, as TL
    assert model.to_str_tokens("ab", prepend_bos=False) == ["a", "b"]
    assert model.get_token_position("a", "abca") == 1
    assert model.get_token_position("a", "abca", mode="last") == 4
    assert model.get_token_position("a", "abca", prepend_bos=False) == 0
    assert model.get_token_position(98, two[:1]) == 2
    with pytest.raises(InterpError, match="does not occur"):
        model.get_token_position("z", "abc")
    assert model.to_single_str_token(97) == "a"
    with pytest.raises(InterpError, match="outside the vocabulary"):
        model.to_single_str_token(999)
    assert model.to_tokens("ab", move_to_device=False).device.type == "cpu"
    dirs = model.tokens_to_residual_directions(torch.tensor([97, 98]))
    assert dirs.shape == (2, 32) and torch.equal(dirs[0], model.W_U[:, 97])
