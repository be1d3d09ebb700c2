"""The one text -> batch helper (interp.tokenize) and the one progress helper (interp.progress).

interp.tokenize replaced four hand-written text -> batch paths (the head taxonomy's
``token_batches``, masking's ``text_to_batches``, the FFN analysis' ``corpus_batches``, the
CLI's text-or-bytes tokenisation). Each old function is kept here verbatim as a reference, and
the new helper must give exactly its tokens (same BOS, specials, truncation, padding, budget)
on an encoder tokenizer, a decoder tokenizer with a BOS, one without, and a model without a
tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from interp import tokenize as T
from interp.progress import Progress, no_progress, progress_bar

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was not amused.",
    "   ",
    "Short.",
    "Interpretability asks what each attention head computes, and why the model needs it; "
    "induction heads copy the token after an earlier occurrence of the current one.",
    "A third text, of middling length, with some punctuation: commas, colons; and dashes - too.",
]


class CharTokenizer:
    """A tiny character tokenizer with a BOS that, like GPT-2's, never adds it itself."""

    bos_token_id = 1
    pad_token_id = 2
    cls_token_id = None
    sep_token_id = None
    padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [3 + (ord(c) % 90) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def _model(tokenizer, architecture: str = "decoder", d_vocab: int = 100, n_ctx: int = 64,
           positional: str = "rope", prepend_bos: bool | None = None):
    cfg = interp.ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=d_vocab, n_ctx=n_ctx,
                             architecture=architecture, positional=positional)
    model = interp.HookedTransformer(cfg, tokenizer=tokenizer)
    if prepend_bos is not None:
        model.prepend_bos = prepend_bos
    return model


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from interp.loading import builtin_path

    try:
        return AutoTokenizer.from_pretrained(str(builtin_path("minilm")))
    except interp.InterpError as e:
        pytest.skip(str(e))


def _models(bert_tokenizer):
    """(name, model) for every case the old paths distinguished."""
    V = bert_tokenizer.vocab_size
    return [
        ("char decoder", _model(CharTokenizer())),
        ("char decoder, no BOS", _model(CharTokenizer(), prepend_bos=False)),
        ("char decoder, learned", _model(CharTokenizer(), positional="learned", n_ctx=32)),
        ("bert encoder", _model(bert_tokenizer, "encoder", V, 64)),
        ("bert decoder (no BOS id)", _model(bert_tokenizer, "decoder", V, 64)),
    ]


# ------------------------------------------------------------ the old functions, verbatim


def old_heads_token_batches(model, texts, *, batch_size=16, max_tokens=None, seq_len=128):
    """analyses/heads.py token_batches before the redesign (with its _pad and _plain)."""
    def _pad(rows, fill):
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), fill, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def _plain(rows):
        ids = _pad(rows, 0)
        valid = _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0).astype(bool)
        return torch.from_numpy(ids), torch.from_numpy(valid)

    seq_len = min(seq_len, min(int(model.cfg.n_ctx), 512))
    rows, seen = [], 0
    for text in texts:
        if not text.strip():
            continue
        ids = model.to_tokens(text, truncate=False)[0].cpu().numpy()
        for i in range(0, len(ids), seq_len):
            rows.append(ids[i: i + seq_len])
            if len(rows) == batch_size:
                if max_tokens is not None and seen >= max_tokens:
                    return
                yield _plain(rows)
                seen += sum(len(r) for r in rows)
                rows = []
    if rows and (max_tokens is None or seen < max_tokens):
        yield _plain(rows)


def old_masking_text_to_batches(model, text, *, seq_len=64, n_seqs=8, batch_size=8):
    """analyses/masking.py text_to_batches before the redesign (argument checks left out)."""
    cfg = model.cfg
    tok = model.tokenizer
    head, tail = [], []
    if tok is None:
        ids = list(text.encode("utf-8"))
    else:
        ids = list(tok.encode(text, add_special_tokens=False))
        if cfg.architecture == "decoder":
            bos = getattr(tok, "bos_token_id", None)
            if bos is not None and getattr(model, "prepend_bos", cfg.default_prepend_bos):
                head = [bos]
        else:
            cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
            head = [cls] if cls is not None else []
            tail = [sep] if sep is not None else []
    body = seq_len - len(head) - len(tail)
    if len(ids) < body:
        body = len(ids)
    rows = [head + ids[i:i + body] + tail for i in range(0, len(ids) - body + 1, body)][:n_seqs]
    seqs = torch.tensor(rows, dtype=torch.long, device=model.device)
    return [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]


def old_ffn_corpus_batches(model, texts, *, batch_size=8, max_tokens=None, max_len=128):
    """analyses/ffn_knowledge.py corpus_batches before the redesign (with _encode/_pad)."""
    def _encode(text):
        return [int(i) for i in model.to_tokens(text)[0].tolist()]

    def _pad(seqs, pad):
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
        return tokens, mask

    pad = getattr(model.tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    seen, buf = 0, []
    for text in texts:
        if not text.strip():
            continue
        ids = _encode(text)[:max_len]
        if max_tokens is not None and seen + len(ids) > max_tokens:
            ids = ids[:max(0, max_tokens - seen)]
        if len(ids) < 2:
            if max_tokens is not None and seen >= max_tokens:
                break
            continue
        buf.append(ids)
        seen += len(ids)
        if len(buf) == batch_size:
            yield _pad(buf, pad)
            buf = []
        if max_tokens is not None and seen >= max_tokens:
            break
    if buf:
        yield _pad(buf, pad)


# ------------------------------------------------------------------------------- tests


def test_encode_is_to_tokens(bert_tokenizer):
    for name, model in _models(bert_tokenizer):
        for text in TEXTS:
            if text.strip():
                ref = model.to_tokens(text, truncate=False)[0].tolist()
                assert T.encode(model, text) == ref, name


@pytest.mark.parametrize("batch_size,seq_len,max_tokens", [(2, 16, None), (3, 7, 40), (1, 128, 10),
                                                           (16, 128, None)])
def test_batches_equal_old_head_token_batches(bert_tokenizer, batch_size, seq_len, max_tokens):
    for name, model in _models(bert_tokenizer):
        ref = list(old_heads_token_batches(model, TEXTS, batch_size=batch_size, seq_len=seq_len,
                                           max_tokens=max_tokens))
        got = list(T.batches(model, TEXTS, batch_size=batch_size,
                             seq_len=min(seq_len, model.cfg.n_ctx, 512), max_tokens=max_tokens))
        assert len(got) == len(ref), name
        for g, (tokens, valid) in zip(got, ref, strict=True):
            assert torch.equal(g.tokens, tokens), name
            assert torch.equal(g.attention_mask, valid), name
            assert g.lengths.tolist() == valid.sum(1).tolist()


@pytest.mark.parametrize("seq_len,n_seqs,batch_size", [(16, 5, 2), (8, 100, 3), (200, 4, 4)])
def test_windows_equal_old_masking_batches(bert_tokenizer, seq_len, n_seqs, batch_size):
    text = " ".join(TEXTS)
    cases = [*_models(bert_tokenizer), ("bytes", _model(None, d_vocab=256))]
    for name, model in cases:
        ref = old_masking_text_to_batches(model, text, seq_len=seq_len, n_seqs=n_seqs,
                                          batch_size=batch_size)
        head, tail = T.frame(model)
        rows = T.windows(T.encode(model, text, specials=False), seq_len, head, tail)[:n_seqs]
        seqs = torch.tensor(rows, dtype=torch.long)
        got = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        assert len(got) == len(ref), name
        for g, r in zip(got, ref, strict=True):
            assert torch.equal(g, r), name


@pytest.mark.parametrize("batch_size,max_len,max_tokens", [(2, 16, None), (3, 128, 50), (8, 5, 7)])
def test_exact_budget_equals_old_ffn_corpus_batches(bert_tokenizer, batch_size, max_len,
                                                    max_tokens):
    for name, model in _models(bert_tokenizer):
        ref = list(old_ffn_corpus_batches(model, TEXTS, batch_size=batch_size, max_len=max_len,
                                          max_tokens=max_tokens))
        learned = model.cfg.positional == "learned"
        seq_len = min(max_len, model.cfg.n_ctx) if learned else max_len
        got = list(T.batches(model, TEXTS, batch_size=batch_size, seq_len=seq_len,
                             max_tokens=max_tokens, split=False, min_len=2, pad=T.pad_id(model),
                             budget="exact"))
        assert len(got) == len(ref), name
        for g, (tokens, mask) in zip(got, ref, strict=True):
            assert torch.equal(g.tokens, tokens), name
            assert torch.equal(g.attention_mask.long(), mask), name


def test_bytes_without_tokenizer():
    model = _model(None, d_vocab=256)
    assert T.encode(model, "hé") == list("hé".encode())
    assert T.frame(model) == ([], [])
    assert T.bos_to_prepend(model) is None
    with pytest.raises(interp.InterpError, match="as bytes"):
        T.encode(_model(None, d_vocab=100), "text")


def test_bos_rule():
    model = _model(CharTokenizer())
    assert model.prepend_bos and T.bos_to_prepend(model) == 1
    assert T.encode(model, "ab") == [1, *CharTokenizer().encode("ab")]
    model.prepend_bos = False
    assert T.bos_to_prepend(model) is None and T.encode(model, "ab") == CharTokenizer().encode("ab")
    enc = _model(CharTokenizer(), "encoder")
    assert T.bos_to_prepend(enc) is None and T.frame(enc) == ([], [])


def test_pad_batch_sides_and_errors():
    right = T.pad_batch([[5, 6, 7], [8]], pad_id=9)
    assert right.tokens.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert right.n_tokens == 4
    left = T.pad_batch([[5, 6, 7], [8]], pad_id=9, side="left")
    assert left.tokens.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left.attention_mask.tolist() == [[True] * 3, [False, False, True]]
    assert left.lengths.tolist() == [3, 1]
    with pytest.raises(interp.InterpError):
        T.pad_batch([])
    with pytest.raises(interp.InterpError, match="no room"):
        T.windows([1, 2, 3], 2, [0], [0])


def test_batches_stream_lazily():
    """A generator of texts is read only as far as the batches asked for."""
    model = _model(CharTokenizer())
    read = []

    def texts():
        for i in range(1000):
            read.append(i)
            yield f"text number {i}"

    it = T.batches(model, texts(), batch_size=2, seq_len=64)
    first = next(it)
    assert first.tokens.shape[0] == 2 and len(read) <= 3


@pytest.mark.slow
def test_smollm2_tokenizer_matches_to_tokens():
    """A real BPE decoder tokenizer with a BOS it does not add itself (SmolLM2's GGUF one)."""
    from interp.loading import builtin_path
    from interp.loading.gguf import gguf_tokenizer

    try:
        tok = gguf_tokenizer(builtin_path("smollm2-135m"))
    except interp.InterpError as e:
        pytest.skip(str(e))
    model = _model(tok, d_vocab=len(tok))
    for text in TEXTS[2:]:
        assert T.encode(model, text) == model.to_tokens(text, truncate=False)[0].tolist()
        assert T.encode(model, text)[0] == tok.bos_token_id
    ref = list(old_heads_token_batches(model, TEXTS, batch_size=2, seq_len=16))
    got = list(T.batches(model, TEXTS, batch_size=2, seq_len=16))
    assert all(torch.equal(g.tokens, r[0]) for g, r in zip(got, ref, strict=True))


def test_progress_helpers(capsys):
    assert list(no_progress(iter([1, 2]), desc="x", total=2)) == [1, 2]
    bar: Progress = progress_bar(quiet=False)
    assert list(bar(range(3), desc="counting", total=3)) == [0, 1, 2]
    quiet = progress_bar(quiet=True)
    assert list(quiet(range(3), desc="silent")) == [0, 1, 2]
    out = capsys.readouterr()
    assert out.out == ""  # bars go to stderr, never stdout
