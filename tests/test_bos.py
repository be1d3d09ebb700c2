"""One BOS rule, taken from the checkpoint (issue 18).

Per loader family a tiny model folder is built offline with the tokenizer class that family
ships (transformers' own classes, saved with ``save_pretrained``); ``model.to_tokens(text)``
must equal what that tokenizer gives with ``add_special_tokens=True``, and ``model.prepend_bos``
must equal ``model.cfg.default_prepend_bos`` (TransformerLens' name). Every text entry point
(``to_tokens``, ``to_str_tokens``, ``forward(str)``, ``run_with_cache(str)``, ``generate(str)``,
:mod:`interp.tokenize`) follows the rule and takes a ``prepend_bos=`` override.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import transformers  # noqa: E402

import interp  # noqa: E402
from interp import tokenize  # noqa: E402
from interp.errors import InterpError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_formats import llama_hf, write_gguf  # noqa: E402

transformers.logging.set_verbosity_error()
V = 64
TEXTS = ["ab c", "hello world", "the cat sat"]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|endoftext|>"]
CHARS = [*"abcdefghijklmnopqrstuvwxyz", "\u2581", "\u0120"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + CHARS)}
SMALL = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=32)


def _gpt2(**kw: Any) -> Any:
    return transformers.GPT2Tokenizer(vocab=VOCAB, merges=[], **kw)


def _neox(**kw: Any) -> Any:
    return transformers.GPTNeoXTokenizer(vocab=VOCAB, merges=[], unk_token="<unk>", **kw)


def _llama(**kw: Any) -> Any:
    return transformers.LlamaTokenizer(vocab=VOCAB, merges=[], **kw)


#: family -> (model factory, tokenizer factory, whether that tokenizer puts BOS first)
FAMILIES: dict[str, tuple[Any, Any, bool]] = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32)), _gpt2, False),
    "gpt2_add_bos": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32)),
        lambda: _gpt2(add_bos_token=True), True),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        **SMALL, intermediate_size=32)), _neox, False),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, intermediate_size=32)), lambda: _llama(add_bos_token=True), True),
    "llama_no_bos": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, intermediate_size=32)), lambda: _llama(add_bos_token=False), False),
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, intermediate_size=16, num_key_value_heads=2, num_local_experts=2,
        num_experts_per_tok=1)),
        lambda: _llama(add_bos_token=True), True),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any, bool]:
    name = request.param
    make_model, make_tok, adds = FAMILIES[name]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    make_model().save_pretrained(folder)
    hf_tok = make_tok()
    hf_tok.save_pretrained(folder)
    return name, interp.load_pretrained(folder), hf_tok, adds


def test_decoder_family_follows_its_tokenizer(family: tuple[str, Any, Any, bool]) -> None:
    name, model, hf_tok, adds = family
    assert model.prepend_bos is adds and model.cfg.default_prepend_bos is adds, name
    assert tokenize.tokenizer_adds_bos(model.tokenizer) is adds
    for text in TEXTS:
        want = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert model.to_tokens(text)[0].tolist() == want, (name, text)
        assert tokenize.encode(model, text) == want
        assert model.to_str_tokens(text) == [hf_tok.decode([i]) for i in want]
    # the override, both ways, on every entry point that reads text
    bos = hf_tok.bos_token_id
    plain = hf_tok("ab c", add_special_tokens=False)["input_ids"]
    assert model.to_tokens("ab c", prepend_bos=False)[0].tolist() == plain
    assert model.to_tokens("ab c", prepend_bos=True)[0].tolist() == [bos, *plain]
    assert len(model.to_str_tokens("ab c", prepend_bos=True)) == len(plain) + 1


def test_text_entry_points_agree_with_to_tokens(family: tuple[str, Any, Any, bool]) -> None:
    _, model, _, _ = family
    for prepend_bos in (None, True, False):
        tokens = model.to_tokens("hello world", prepend_bos=prepend_bos)
        want = model(tokens)
        assert torch.equal(model("hello world", prepend_bos=prepend_bos), want)
        logits, cache = model.run_with_cache("hello world", prepend_bos=prepend_bos)
        assert torch.allclose(logits, want, atol=1e-5)  # eager kernels under the cache
        assert cache["hook_embed"].shape[1] == tokens.shape[1]
        out = model.generate("hello world", max_new_tokens=2, prepend_bos=prepend_bos,
                             return_type="tokens", stop_at_eos=False)
        assert torch.equal(out[:, : tokens.shape[1]], tokens)


def test_bert_folder_gives_cls_and_sep(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    model = interp.load_pretrained(tmp_path)
    hf_tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    assert model.prepend_bos is False and model.cfg.default_prepend_bos is False
    for text in ("hello world", "the cat"):
        want = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert model.to_tokens(text)[0].tolist() == want
        assert model.to_str_tokens(text)[0] == "[CLS]"


def test_t5_folder_appends_eos(tmp_path: Path) -> None:
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=2, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    hf_tok = transformers.T5Tokenizer(vocab=[(w, 0.0) for w in VOCAB], extra_ids=0)
    hf_tok.save_pretrained(tmp_path)
    model = interp.load_pretrained(tmp_path)
    assert model.prepend_bos is False and model.cfg.default_prepend_bos is False
    for text in TEXTS:
        want = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert model.to_tokens(text)[0].tolist() == want
    # a list of texts is padded with the padding masked: each row gives what it gives alone
    dec = torch.tensor([[0, 5, 6]])
    both = model(["ab", "hello world"], dec.expand(2, -1))
    for i, text in enumerate(["ab", "hello world"]):
        assert (both[i] - model(text, dec)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("add_bos", [False, True])
def test_gguf_follows_its_add_bos_token(tmp_path: Path, add_bos: bool) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(llama_hf(), path, add_bos=add_bos)
    model = interp.load_pretrained(path)
    assert model.prepend_bos is add_bos and model.cfg.default_prepend_bos is add_bos
    ids = model.to_tokens("the cat")[0].tolist()
    assert (ids[0] == model.tokenizer.bos_token_id) is add_bos
    # an explicit override beats the file
    forced = interp.load_pretrained(path, default_prepend_bos=not add_bos)
    assert forced.prepend_bos is (not add_bos)


def test_interp_checkpoint_keeps_its_rule(tmp_path: Path) -> None:
    """Shipped checkpoints (word tokenizers with a BOS) prepend it; a saved choice comes back."""
    shipped = Path(interp.__file__).parent / "data" / "induction.pt"
    model = interp.load_pretrained(shipped)
    assert model.prepend_bos is True and model.cfg.default_prepend_bos is True
    text = " ".join(model.tokenizer.tokens[1:4])
    bos = model.tokenizer.bos_token_id
    assert model.to_tokens(text)[0].tolist() == model.tokenizer.encode(text, True)
    assert model.to_tokens(text)[0, 0].item() == bos
    model.prepend_bos = False
    interp.loading.save_checkpoint(model, tmp_path / "no_bos.pt")
    again = interp.load_pretrained(tmp_path / "no_bos.pt")
    assert again.prepend_bos is False and again.to_tokens(text)[0, 0].item() != bos


def test_config_built_models_and_overrides() -> None:
    cfg = interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=300, n_ctx=8)
    tok = interp.tokenizers.ByteTokenizer()
    model = interp.HookedTransformer(cfg, tokenizer=tok)
    assert model.prepend_bos and model.to_tokens("ab")[0].tolist() == [256, 97, 98]
    model.prepend_bos = False
    assert model.cfg.default_prepend_bos is False and model.to_tokens("ab")[0].tolist() == [97, 98]
    with pytest.raises(InterpError, match="prepend_bos must be True or False"):
        model.prepend_bos = 1
    # truncation to n_ctx holds for every position scheme
    for positional in ("learned", "rope", "alibi", "sinusoidal"):
        m = interp.HookedTransformer(interp.ModelConfig(**{**cfg.to_dict(), "mask": "causal",
                                                           "positional": positional}), tok)
        assert m.to_tokens("x" * 50).shape == (1, 8)
        assert m.to_tokens("x" * 50, truncate=False).shape == (1, 51)


@pytest.mark.slow
def test_builtins_follow_their_checkpoints() -> None:
    """SmolLM2's GGUF says add_bos_token = false (its BOS is a chat marker); MiniLM is BERT."""
    smol = interp.load_pretrained("smollm2-135m")
    assert smol.prepend_bos is False and smol.cfg.default_prepend_bos is False
    assert smol.to_str_tokens("Hello world") == ["Hello", " world"]
    minilm = interp.load_pretrained("minilm")
    assert minilm.cfg.default_prepend_bos is False
    assert minilm.to_str_tokens("hello world") == ["[CLS]", "hello", "world", "[SEP]"]
