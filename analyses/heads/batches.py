"""What the head scanners read: vocabulary facts and the three kinds of batch.

- :class:`VocabInfo`: which token ids are BOS, [CLS], [SEP], other specials, punctuation
  (sinks and delimiters, Clark et al. 2019 sec. 3).
- :func:`sentence_batches`: parsed sentences with a piece -> word map and the gold dependency
  pairs, for the word-level syntactic scores (Clark et al. 2019 sec. 4.2).
- :func:`token_batches`: plain text, for the token-level scores (text -> ids by
  :func:`interp.tokenize.batches`, the one tokenisation path every analysis shares).
- :func:`random_batches`: repeated random tokens ``x1..xn x1..xn`` for the induction and
  duplicate-token scores (Olsson et al. 2022).

Every generator streams: memory is a few batches, whatever the corpus size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from analyses import parses
from analyses.parses import EncodedSentence, Sentence
from interp import HookedTransformer, tokenize
from interp.errors import InterpError

__all__ = ["RelationIndex", "TokenBatch", "VocabInfo", "random_batches", "sentence_batches",
           "token_batches"]


@dataclass(frozen=True)
class VocabInfo:
    """Which token ids are special (BOS, [CLS], [SEP], ...) or punctuation."""

    bos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    special_ids: tuple[int, ...] = ()
    punct: torch.Tensor | None = None  # bool [d_vocab]

    @classmethod
    def from_model(cls, model: HookedTransformer) -> VocabInfo:
        """Read the special ids and a punctuation table from ``model.tokenizer`` (none
        without one)."""
        tok = model.tokenizer
        if tok is None:
            return cls()
        d_vocab = int(model.cfg.d_vocab)

        def tid(name: str) -> int | None:
            v = getattr(tok, name, None)
            return int(v) if isinstance(v, int) and 0 <= v < d_vocab else None

        bos, cls_, sep = tid("bos_token_id"), tid("cls_token_id"), tid("sep_token_id")
        all_special = getattr(tok, "all_special_ids", None) or []
        special = set(int(i) for i in all_special if 0 <= int(i) < d_vocab)
        others = (tid("eos_token_id"), tid("pad_token_id"), tid("unk_token_id"))
        special |= {i for i in (bos, cls_, sep, *others) if i is not None}
        punct = None
        convert = getattr(tok, "convert_ids_to_tokens", None)
        if convert is not None:
            n = min(d_vocab, len(tok) if hasattr(tok, "__len__") else d_vocab)
            names = convert(list(range(n)))
            flags = [parses.is_punctuation(t) if isinstance(t, str) else False for t in names]
            punct = torch.zeros(d_vocab, dtype=torch.bool)
            punct[:n] = torch.tensor(flags, dtype=torch.bool)
            if special:
                punct[list(special)] = False
        return cls(bos, cls_, sep, tuple(sorted(special)), punct)


@dataclass
class TokenBatch:
    """One batch as the scanners see it.

    ``tokens`` [batch, pos], ``valid`` [batch, pos] (False = padding). Parsed batches add
    ``piece2word`` [batch, pos] (-1: no word), ``n_words`` [batch] and ``pairs`` [P, 4] rows
    (row, query word, gold partner word, group = 2 * relation index + direction). Repeated
    random batches add ``repeat`` = (start of the first copy, copy length).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    piece2word: torch.Tensor | None = None
    n_words: torch.Tensor | None = None
    pairs: torch.Tensor | None = None
    repeat: tuple[int, int] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.valid.sum())


class RelationIndex:
    """Relation name <-> index, grown as new relations appear in a streamed corpus."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]


def is_causal(model: HookedTransformer) -> bool:
    """Whether no query can see a later key (causal, or causal combined with a window)."""
    mask = model.effective_mask
    if model.cfg.soft_mask_penalty is not None:
        return False
    return bool(mask.is_causal) or not bool(mask.build(8, 8).triu(1).any())


def max_len(model: HookedTransformer, cap: int = 512) -> int:
    """Longest sequence to feed: the model's context ``n_ctx`` (a hard limit for learned
    positions, the trained length for RoPE/ALiBi models that may not extrapolate), at most
    ``cap``."""
    return min(int(model.cfg.n_ctx), cap)


def _pad(rows: list[np.ndarray], fill: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _gold_pairs(part: list[EncodedSentence], relations: RelationIndex,
                causal: bool) -> torch.Tensor:
    """[P, 4] rows (row, query word, partner word, 2 * relation + direction) of the gold arcs
    whose two words both kept a piece; in a causal model only partners before the query."""
    pairs = []
    for b, e in enumerate(part):
        heads = np.asarray(e.sentence.heads, dtype=np.int64)
        have = np.zeros(len(e.sentence) + 1, dtype=bool)
        have[e.piece2word[e.piece2word >= 0]] = True
        dep = np.arange(len(heads))
        keep = (heads >= 0) & have[dep] & have[np.clip(heads, 0, None)]
        rel = np.array([relations(parses.relation_of(r)) for r in e.sentence.deprels],
                       dtype=np.int64)
        dep, hd, rel = dep[keep], heads[keep], rel[keep]
        for direction, (q, t) in enumerate(((dep, hd), (hd, dep))):
            ok = t < q if causal else np.ones(len(q), dtype=bool)
            if ok.any():
                n = int(ok.sum())
                pairs.append(np.stack([np.full(n, b), q[ok], t[ok], 2 * rel[ok] + direction], 1))
    if not pairs:
        return torch.zeros(0, 4, dtype=torch.long)
    return torch.from_numpy(np.concatenate(pairs))


def _parsed_batch(part: list[EncodedSentence], pad: int, relations: RelationIndex,
                  causal: bool) -> TokenBatch:
    padded = tokenize.pad_batch([e.ids for e in part], pad_id=pad)
    p2w = _pad([e.piece2word for e in part], -1)
    n_words = np.array([len(e.sentence) for e in part], dtype=np.int64)
    return TokenBatch(padded.tokens, padded.attention_mask, torch.from_numpy(p2w),
                      torch.from_numpy(n_words), _gold_pairs(part, relations, causal))


def sentence_batches(model: HookedTransformer, sentences: Iterable[Sentence], *,
                     batch_size: int = 16, max_tokens: int | None = None,
                     relations: RelationIndex | None = None,
                     buffer: int = 16) -> Iterator[TokenBatch]:
    """Parsed sentences -> :class:`TokenBatch` es with word maps and gold pairs.

    Streams: ``buffer`` batches of sentences are tokenised at once and sorted by length (less
    padding), then yielded; nothing else is kept. Decoders get BOS prepended
    (:func:`interp.tokenize.bos_to_prepend`), encoders their tokenizer's specials. In a causal
    model a word can only attend backwards, so only pairs whose partner precedes the query
    are scored (and the baseline offsets are -3..-1).
    """
    tok = model.tokenizer
    if tok is None:
        raise InterpError("This model has no tokenizer, so it cannot read sentences; run "
                          "without --text/--conllu.")
    relations = relations if relations is not None else RelationIndex()
    decoder = model.cfg.architecture == "decoder"
    bos, pad = tokenize.bos_to_prepend(model), tokenize.pad_id(model)
    causal, longest = is_causal(model), max_len(model)
    seen = 0
    it = iter(sentences)
    while True:
        chunk = []
        for s in it:
            if len(s):
                chunk.append(s)
            if len(chunk) >= batch_size * buffer:
                break
        if not chunk:
            return
        enc = parses.encode_sentences(tok, chunk, add_special_tokens=not decoder, bos_id=bos,
                                      max_len=longest)
        enc.sort(key=lambda e: len(e.ids))
        for i in range(0, len(enc), batch_size):
            part = [e for e in enc[i: i + batch_size] if len(e.ids)]
            if not part:
                continue
            if max_tokens is not None and seen >= max_tokens:
                return
            batch = _parsed_batch(part, pad, relations, causal)
            seen += batch.n_tokens
            yield batch


def token_batches(model: HookedTransformer, texts: Iterable[str], *, batch_size: int = 16,
                  max_tokens: int | None = None, seq_len: int = 128) -> Iterator[TokenBatch]:
    """Plain text (no parse) -> batches for the token-level scores. Each text is encoded as
    ``model.to_tokens`` would (BOS / specials as the model adds them) and cut into sequences
    of ``seq_len``; whole batches are read while fewer than ``max_tokens`` tokens came before
    (see :func:`interp.tokenize.batches`)."""
    if model.tokenizer is None:
        raise InterpError("This model has no tokenizer, so it cannot read text; run without "
                          "--text/--conllu.")
    for b in tokenize.batches(model, texts, batch_size=batch_size,
                              seq_len=min(seq_len, max_len(model)), max_tokens=max_tokens):
        yield TokenBatch(b.tokens, b.attention_mask)


def random_batches(model: HookedTransformer, *, n_seqs: int = 64, half_len: int | None = None,
                   batch_size: int = 16, seed: int = 0,
                   vocab: VocabInfo | None = None) -> Iterator[TokenBatch]:
    """Repeated random tokens ``[BOS] x1..xn x1..xn`` (decoders, BOS when the model prepends
    one; encoders: ``[CLS] x x [SEP]``).

    The n tokens of a copy are distinct (sampled without replacement from the non-special
    ids), so "the previous occurrence" is unique, as in Olsson et al. 2022. ``half_len``
    defaults to 32, cut to fit the model's context ``n_ctx`` (its trained length).
    """
    vocab = vocab or VocabInfo.from_model(model)
    if model.cfg.architecture == "decoder":
        bos = vocab.bos_id if tokenize.bos_to_prepend(model) is not None else None
        pre, post = ([bos] if bos is not None else []), []
    else:
        pre = [vocab.cls_id] if vocab.cls_id is not None else []
        post = [vocab.sep_id] if vocab.sep_id is not None else []
    room = max_len(model) - len(pre) - len(post)
    n = min(half_len or 32, room // 2)
    if n < 2:
        raise InterpError(f"The model's context (n_ctx={model.cfg.n_ctx}) is too short for "
                          "repeated random tokens; need room for 2 x 2 tokens.")
    pool = _ordinary_ids(model, vocab, n)
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_seqs:
        b = min(batch_size, n_seqs - done)
        pick = torch.multinomial(torch.ones(b, len(pool)), n, replacement=False, generator=gen)
        half = pool[pick]
        parts = [torch.tensor(pre, dtype=torch.long).expand(b, -1), half, half,
                 torch.tensor(post, dtype=torch.long).expand(b, -1)]
        tokens = torch.cat(parts, 1)
        yield TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), repeat=(len(pre), n))
        done += b


def _ordinary_ids(model: HookedTransformer, vocab: VocabInfo, n: int) -> torch.Tensor:
    """Ids random copies are drawn from: not special, and not punctuation where enough remain."""
    allowed = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
    if vocab.special_ids:
        allowed[list(vocab.special_ids)] = False
    if vocab.punct is not None and int((allowed & ~vocab.punct).sum()) >= n:
        allowed &= ~vocab.punct
    pool = allowed.nonzero()[:, 0]
    if len(pool) < n:
        raise InterpError(f"The vocabulary has only {len(pool)} ordinary tokens; repeated random "
                          f"tokens need {n}.")
    return pool
