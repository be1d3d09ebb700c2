"""Head taxonomy: what does each attention head do?

Every score is streamed over batches with running sums (memory does not grow with the corpus)
from ``blocks.{l}.attn.hook_pattern`` alone: forward hooks reduce each layer's pattern
[batch, head, q, k] to per-head sums on the fly and keep nothing, so only the hooked layers
run the eager kernel. Any model with our hook names works (decoder or encoder).

Scores (columns of :func:`analyze`'s ``heads`` frame), with the work they come from:

- **Positional** (Voita et al. 2019, *Analyzing Multi-Head Self-Attention: Specialized Heads Do
  the Heavy Lifting, the Rest Can Be Pruned*, ACL): ``top_offset_{o}`` is the share of queries
  whose most-attended key sits at relative offset o in -3..+3 (the argmax over non-sink keys:
  attention parked on the first or a special token is a no-op, not a position); a head is
  positional when one offset takes at least 90% (``positional_share``, ``positional_offset``).
  ``attn_offset_{o}`` is the mean attention weight at offset o; ``prev_token`` =
  ``attn_offset_-1``. ``mode_offset`` / ``mode_share``: the most frequent argmax offset at any
  distance up to 32 and its share (a fixed long offset is reported, not labelled).
- **Induction, duplicate-token** (Olsson et al. 2022, *In-context Learning and Induction
  Heads*, Transformer Circuits Thread): on sequences ``x1..xn x1..xn`` of distinct random tokens,
  ``induction`` (prefix matching) is the mean attention from a second-copy token to the token
  after its first occurrence, ``duplicate`` the mean attention to the first occurrence itself;
  ``rand_prev_token`` and ``rand_first`` are the previous-token and first-token attention on
  the same sequences. ``copying`` is the OV circuit's eigenvalue score sum(l)/sum(|l|) of
  W_E W_V W_O W_U (Elhage et al. 2021, *A Mathematical Framework for Transformer Circuits*;
  computed as the equal non-zero spectrum of the d_head x d_head cyclic product, norm gains
  folded in), where the model has an unembedding.
- **Sinks and delimiters** (Clark et al. 2019, *What Does BERT Look At?*, BlackboxNLP; Xiao et
  al. 2024, *Efficient Streaming Language Models with Attention Sinks*, ICLR): mean attention
  share to the first token (``sink_first``), to BOS, [CLS], [SEP] tokens anywhere, to any
  special token, and to punctuation (``punct``). ``sink`` is the largest of first/BOS/[CLS]/[SEP].
- **Range**: with the sink mass (first and special tokens) removed and the rest renormalised,
  the mean attention distance |q - k| (``mean_distance``; ``distance_ratio`` divides it by what
  a uniform head over the same keys would give), the entropy (nats) and ``entropy_norm`` (the
  entropy over log of the number of visible keys: 1 = uniform). Clark et al. 2019 sec. 3.
- **Syntactic** (Clark et al. 2019, sec. 4.2): word-level attention (rows averaged over the
  query word's pieces, columns summed over the key word's pieces, special tokens and the word
  itself ignored); for each relation and direction, accuracy = share of pairs whose
  most-attended word is the gold partner, against the best fixed offset in -3..+3. A head is
  syntactic for a relation when it beats that baseline by >= 10 points on >= ``syntax_min_n``
  pairs, the margin being >= 3 standard errors (a guard against the many relation x head
  comparisons on small corpora); punctuation, root and dep never make a label. See
  :func:`syntax_table`.
- **Semantic** (our operationalisation, stated so it can be checked): ``semantic`` is the
  partial correlation between the attention weight a(q, k) and the cosine similarity of the
  two tokens' static input embeddings W_E, controlling for relative position (relative offset
  as a fixed effect: the pooled within-offset correlation, Frisch-Waugh-Lovell), over pairs of
  distinct token ids, excluding self, sink, special and punctuation keys. It asks whether a
  head attends to *similar content* more than its positional habit explains, the property
  Clark et al. 2019 (sec. 5, coreference) and Vig and Belinkov 2019 (*Analyzing the Structure
  of Attention in a Transformer Language Model*, BlackboxNLP) probe with labelled properties;
  identical tokens are left to the duplicate-token score.

Labels (:func:`classify`), first rule that holds, by specificity: induction, duplicate-token,
previous-token, positional, syntactic:<relation>, semantic, sink, local, long-range, uniform,
else unclassified. ``confidence`` is the score that fired the rule (a share or accuracy in 0..1);
for ``unclassified`` it is 1 minus the strongest score relative to its threshold. Every rule
that holds is listed in ``criteria``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import parses
from analyses.parses import RELATIONS, Sentence
from interp.errors import InterpError

__all__ = [
    "OFFSETS",
    "THRESHOLDS",
    "HeadAnalysis",
    "Thresholds",
    "TokenBatch",
    "VocabInfo",
    "analyze",
    "classify",
    "compare",
    "copying_scores",
    "induction_scores",
    "layer_table",
    "random_batches",
    "scan",
    "sentence_batches",
    "syntax_table",
    "token_batches",
]

OFFSETS = (-3, -2, -1, 0, 1, 2, 3)
SEMANTIC_MAX_OFFSET = 32  # relative offsets beyond +-32 share one fixed-effect bucket per side
MODE_MAX_OFFSET = 32  # mode_offset looks at argmax offsets up to +-32 (beyond: clipped)
DIRECTIONS = ("dependent->head", "head->dependent")
# Relations never used for a syntactic label (still in the syntax table): attention to
# punctuation is the delimiter behaviour measured by the ``punct`` share (Clark et al. sec. 3),
# and root/dep are not relations between two words.
NOT_SYNTACTIC = ("punct", "root", "dep")
Progress = Callable[..., Iterable]


@dataclass(frozen=True)
class Thresholds:
    """Where a score becomes a label. Defaults follow the cited papers where they give one."""

    positional: float = 0.9  # Voita et al. 2019: >= 90% of maximum attention at one offset
    prev_token: float = 0.4  # mean attention to i-1 (a softer previous-token criterion, as ARENA's detectors)
    induction: float = 0.3  # prefix-matching attention on repeated random tokens
    duplicate: float = 0.3
    sink: float = 0.5  # half of all attention on the first / special tokens
    syntax_margin: float = 0.10  # accuracy minus best fixed-offset baseline (Clark et al.)
    syntax_min_n: int = 50  # pairs a relation needs before a head is called syntactic for it
    syntax_z: float = 3.0  # and the margin must be this many standard errors (two-proportion z)
    semantic: float = 0.3  # within-offset correlation of attention with embedding similarity
    local: float = 0.5  # distance_ratio at or below: local
    long_range: float = 1.5  # distance_ratio at or above: long-range
    uniform: float = 0.9  # entropy_norm at or above: uniform (broad) attention


THRESHOLDS = Thresholds()


# =========================================================================== inputs


@dataclass(frozen=True)
class VocabInfo:
    """Which token ids are special (BOS, [CLS], [SEP], ...) or punctuation."""

    bos_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    special_ids: tuple[int, ...] = ()
    punct: torch.Tensor | None = None  # bool [d_vocab]

    @classmethod
    def from_model(cls, model: Any) -> VocabInfo:
        """Read the special ids and a punctuation table from ``model.tokenizer`` (none without one)."""
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            return cls()

        def tid(name: str) -> int | None:
            v = getattr(tok, name, None)
            return int(v) if isinstance(v, int) and 0 <= v < model.cfg.d_vocab else None

        bos, cls_, sep = tid("bos_token_id"), tid("cls_token_id"), tid("sep_token_id")
        special = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []) if 0 <= int(i) < model.cfg.d_vocab)
        special |= {i for i in (bos, cls_, sep, tid("eos_token_id"), tid("pad_token_id"), tid("unk_token_id")) if i is not None}
        punct = None
        convert = getattr(tok, "convert_ids_to_tokens", None)
        if convert is not None:
            n = min(int(model.cfg.d_vocab), len(tok) if hasattr(tok, "__len__") else int(model.cfg.d_vocab))
            names = convert(list(range(n)))
            flags = [parses.is_punctuation(t) if isinstance(t, str) else False for t in names]
            punct = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
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


def _is_causal(model: Any) -> bool:
    """Whether no query can see a later key (causal, or causal combined with a window)."""
    mask = model.effective_mask
    if model.cfg.soft_mask_penalty is not None:
        return False
    return bool(mask.is_causal) or not bool(mask.build(8, 8).triu(1).any())


def _bos_to_prepend(model: Any, vocab_bos: int | None) -> int | None:
    """The BOS id a decoder puts first, following the model's own convention
    (``model.prepend_bos``, set by loaders from the checkpoint; decoders default to True)."""
    if model.cfg.architecture != "decoder" or vocab_bos is None:
        return None
    return vocab_bos if getattr(model, "prepend_bos", model.cfg.default_prepend_bos) else None


def _max_len(model: Any, cap: int = 512) -> int:
    """Longest sequence to feed: the model's context ``n_ctx`` (a hard limit for learned
    positions, the trained length for RoPE/ALiBi models that may not extrapolate), at most ``cap``."""
    return min(int(model.cfg.n_ctx), cap)


def _pad(rows: list[np.ndarray], fill: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def sentence_batches(model: Any, sentences: Iterable[Sentence], *, batch_size: int = 16, max_tokens: int | None = None,
                     relations: RelationIndex | None = None, buffer: int = 16) -> Iterator[TokenBatch]:
    """Parsed sentences -> :class:`TokenBatch` es with word maps and gold pairs.

    Streams: ``buffer`` batches of sentences are tokenised at once and sorted by length (less
    padding), then yielded; nothing else is kept. Decoders get BOS prepended, encoders their
    tokenizer's specials. In a causal model a word can only attend backwards, so only pairs
    whose partner precedes the query are scored (and the baseline offsets are -3..-1).
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InterpError("This model has no tokenizer, so it cannot read sentences; run without --text/--conllu.")
    relations = relations if relations is not None else RelationIndex()
    decoder = model.cfg.architecture == "decoder"
    bos = _bos_to_prepend(model, getattr(tok, "bos_token_id", None))
    pad = getattr(tok, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    causal = _is_causal(model)
    max_len = _max_len(model)
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
        enc = parses.encode_sentences(tok, chunk, add_special_tokens=not decoder, bos_id=bos, max_len=max_len)
        enc.sort(key=lambda e: len(e.ids))
        for i in range(0, len(enc), batch_size):
            part = [e for e in enc[i: i + batch_size] if len(e.ids)]
            if not part:
                continue
            if max_tokens is not None and seen >= max_tokens:
                return
            ids = _pad([e.ids for e in part], pad)
            p2w = _pad([e.piece2word for e in part], -1)
            valid = _pad([np.ones(len(e.ids), dtype=np.int64) for e in part], 0).astype(bool)
            n_words = np.array([len(e.sentence) for e in part], dtype=np.int64)
            pairs = []
            for b, e in enumerate(part):
                heads = np.asarray(e.sentence.heads, dtype=np.int64)
                have = np.zeros(len(e.sentence) + 1, dtype=bool)
                have[e.piece2word[e.piece2word >= 0]] = True
                dep = np.arange(len(heads))
                keep = (heads >= 0) & have[dep] & have[np.clip(heads, 0, None)]
                rel = np.array([relations(parses.relation_of(r)) for r in e.sentence.deprels], dtype=np.int64)
                dep, hd, rel = dep[keep], heads[keep], rel[keep]
                for direction, (q, t) in enumerate(((dep, hd), (hd, dep))):
                    ok = t < q if causal else np.ones(len(q), dtype=bool)
                    if ok.any():
                        pairs.append(np.stack([np.full(int(ok.sum()), b), q[ok], t[ok], 2 * rel[ok] + direction], 1))
            pairs_t = torch.from_numpy(np.concatenate(pairs)) if pairs else torch.zeros(0, 4, dtype=torch.long)
            seen += int(valid.sum())
            yield TokenBatch(torch.from_numpy(ids), torch.from_numpy(valid), torch.from_numpy(p2w),
                             torch.from_numpy(n_words), pairs_t)


def token_batches(model: Any, texts: Iterable[str], *, batch_size: int = 16, max_tokens: int | None = None,
                  seq_len: int = 128) -> Iterator[TokenBatch]:
    """Plain text (no parse) -> batches for the token-level scores; used when the model's
    tokenizer has no character offsets. Each text is encoded with ``model.to_tokens`` and cut
    into sequences of ``seq_len`` (BOS / specials as the model adds them)."""
    if getattr(model, "tokenizer", None) is None:
        raise InterpError("This model has no tokenizer, so it cannot read text; run without --text/--conllu.")
    seq_len = min(seq_len, _max_len(model))
    rows: list[np.ndarray] = []
    seen = 0
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


def _plain(rows: list[np.ndarray]) -> TokenBatch:
    ids = _pad(rows, 0)
    valid = _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0).astype(bool)
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(valid))


def random_batches(model: Any, *, n_seqs: int = 64, half_len: int | None = None, batch_size: int = 16, seed: int = 0,
                   vocab: VocabInfo | None = None) -> Iterator[TokenBatch]:
    """Repeated random tokens ``[BOS] x1..xn x1..xn`` (decoders, BOS when the model prepends
    one; encoders: ``[CLS] x x [SEP]``).

    The n tokens of a copy are distinct (sampled without replacement from the non-special
    ids), so "the previous occurrence" is unique, as in Olsson et al. 2022. ``half_len``
    defaults to 32, cut to fit the model's context ``n_ctx`` (its trained length).
    """
    vocab = vocab or VocabInfo.from_model(model)
    decoder = model.cfg.architecture == "decoder"
    bos = _bos_to_prepend(model, vocab.bos_id)
    pre = ([bos] if bos is not None else []) if decoder else ([vocab.cls_id] if vocab.cls_id is not None else [])
    post = [vocab.sep_id] if not decoder and vocab.sep_id is not None else []
    room = _max_len(model) - len(pre) - len(post)
    n = min(half_len or 32, room // 2)
    if n < 2:
        raise InterpError(f"The model's context (n_ctx={model.cfg.n_ctx}) is too short for repeated random tokens; need room for 2 x 2 tokens.")
    allowed = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
    if vocab.special_ids:
        allowed[list(vocab.special_ids)] = False
    if vocab.punct is not None and int((allowed & ~vocab.punct).sum()) >= n:
        allowed &= ~vocab.punct
    pool = allowed.nonzero()[:, 0]
    if len(pool) < n:
        raise InterpError(f"The vocabulary has only {len(pool)} ordinary tokens; repeated random tokens need {n}.")
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < n_seqs:
        b = min(batch_size, n_seqs - done)
        pick = torch.multinomial(torch.ones(b, len(pool)), n, replacement=False, generator=gen)
        half = pool[pick]
        parts = [torch.tensor(pre, dtype=torch.long).expand(b, -1), half, half, torch.tensor(post, dtype=torch.long).expand(b, -1)]
        tokens = torch.cat(parts, 1)
        yield TokenBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), repeat=(len(pre), n))
        done += b


# =========================================================================== accumulators


class _Accumulator:
    """Running sums for all layers; ``begin`` sees each batch once, ``update`` each layer's pattern."""

    def begin(self, batch: TokenBatch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, layer: int, pattern: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class TokenStats(_Accumulator):
    """Positional, sink/delimiter, range and semantic sums per head (see the module docstring)."""

    KINDS = ("first", "bos", "cls", "sep", "special", "punct")

    def __init__(self, model: Any, vocab: VocabInfo, *, semantic: bool = True):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.vocab, self.causal = vocab, _is_causal(model)
        self.mask = model.effective_mask
        self.soft = model.cfg.soft_mask_penalty is not None
        self.device = model.W_E.device
        self.W_E = model.W_E.detach() if semantic else None
        L, H, K, n_off = self.L, self.H, len(self.KINDS), len(OFFSETS)
        f = dict(dtype=torch.float64, device=self.device)
        self.top = torch.zeros(L, H, n_off, **f)
        self.top_all = torch.zeros(L, H, 2 * MODE_MAX_OFFSET + 1, **f)  # argmax offsets -32..+32
        self.n_top = 0.0
        self.off = torch.zeros(L, H, n_off, **f)
        self.n_off = torch.zeros(n_off, **f)
        self.kind = torch.zeros(L, H, K, **f)
        self.n_q = 0.0
        self.dist = torch.zeros(L, H, **f)
        self.udist = torch.zeros(L, H, **f)
        self.ent = torch.zeros(L, H, **f)
        self.entn = torch.zeros(L, H, **f)
        self.n_range = torch.zeros(L, H, **f)
        NB = 2 * SEMANTIC_MAX_OFFSET + 1
        self.sa = torch.zeros(L, H, NB, **f)
        self.saa = torch.zeros(L, H, NB, **f)
        self.sas = torch.zeros(L, H, NB, **f)
        self.sn = torch.zeros(NB, **f)
        self.ss = torch.zeros(NB, **f)
        self.sss = torch.zeros(NB, **f)
        self.n_tokens = 0
        self.n_seqs = 0

    def begin(self, batch: TokenBatch) -> None:
        tokens, valid = batch.tokens.to(self.device), batch.valid.to(self.device)
        B, T = tokens.shape
        ar = torch.arange(T, device=self.device)
        v = self.vocab
        kinds = torch.zeros(B, T, len(self.KINDS), device=self.device)
        kinds[:, 0, 0] = 1.0
        for j, tid in ((1, v.bos_id), (2, v.cls_id), (3, v.sep_id)):
            if tid is not None:
                kinds[..., j] = (tokens == tid).float()
        special = torch.zeros_like(tokens, dtype=torch.bool)
        if v.special_ids:
            special = torch.isin(tokens, torch.tensor(v.special_ids, device=self.device))
        kinds[..., 4] = special.float()
        punct = v.punct.to(self.device)[tokens] if v.punct is not None else torch.zeros_like(special)
        kinds[..., 5] = punct.float()
        kinds = kinds * valid[..., None]
        self.kinds = kinds
        self.qv = valid.float()  # [B, T] queries
        self.n_q += float(valid.sum())
        self.off_mask = []
        for j, o in enumerate(OFFSETS):
            qm = (valid[:, max(0, -o): T - max(0, o)] & valid[:, max(0, o): T - max(0, -o)]).float()
            self.off_mask.append(qm)
            self.n_off[j] += float(qm.sum())
        # visible keys per query under the model's mask and the padding
        vis = torch.ones(T, T, dtype=torch.bool, device=self.device) if self.soft else self.mask.build(T, T, device=self.device)
        vis = vis[None] & valid[:, None, :] & valid[:, :, None]  # [B, q, k]
        sink = (kinds[..., 0] + kinds[..., 4]).clamp(max=1.0) > 0  # first or special
        self.nonsink = (valid & ~sink).float()  # [B, k]
        keys = vis & ~sink[:, None, :]
        n_keys = keys.sum(-1).float()  # [B, q]
        D = (ar[:, None] - ar[None, :]).abs().float()  # [q, k]
        self.D = D
        self.udist_q = torch.where(n_keys > 0, (keys.float() * D).sum(-1) / n_keys.clamp(min=1), 0.0)
        self.logn = torch.log(n_keys.clamp(min=1))
        self.range_q = valid & (n_keys >= 2)  # [B, q]
        # the positional argmax runs over non-sink keys: attention parked on the first token or a
        # special token is a no-op (Clark et al. 2019 sec. 3; Xiao et al. 2024), not a position
        self.top_keys = keys
        q_top = valid & (n_keys >= 1)
        self.q_top = q_top.float()
        self.n_top += float(q_top.sum())
        self.n_tokens += int(valid.sum())
        self.n_seqs += B
        self.sem = None
        if self.W_E is not None:
            emb = torch.nn.functional.normalize(self.W_E[tokens].float(), dim=-1)
            sim = emb @ emb.transpose(1, 2)  # [B, q, k]
            ok = keys & ~punct[:, None, :] & (tokens[:, :, None] != tokens[:, None, :]) & ~sink[:, :, None]
            ok &= ~torch.eye(T, dtype=torch.bool, device=self.device)[None]
            idx = ok.reshape(-1).nonzero()[:, 0]
            if len(idx):
                rel = (ar[None, :] - ar[:, None]).clamp(-SEMANTIC_MAX_OFFSET, SEMANTIC_MAX_OFFSET) + SEMANTIC_MAX_OFFSET
                bucket = rel[None].expand(B, T, T).reshape(-1)[idx]
                s = sim.reshape(-1)[idx].double()
                self.sn.index_add_(0, bucket, torch.ones_like(s))
                self.ss.index_add_(0, bucket, s)
                self.sss.index_add_(0, bucket, s * s)
                self.sem = (idx, bucket, s)

    def update(self, layer: int, pattern: torch.Tensor) -> None:
        p = pattern.float()  # [B, H, q, k]
        B, H, T, _ = p.shape
        ar = torch.arange(T, device=p.device)
        rel = p.masked_fill(~self.top_keys[:, None], -1.0).argmax(-1) - ar  # [B, H, q]
        offs = torch.tensor(OFFSETS, device=p.device)
        hits = (rel[..., None] == offs) & (self.q_top[:, None, :, None] > 0)
        self.top[layer] += hits.sum((0, 2)).double()
        nb = 2 * MODE_MAX_OFFSET + 1
        bins = (rel.clamp(-MODE_MAX_OFFSET, MODE_MAX_OFFSET) + MODE_MAX_OFFSET) + nb * torch.arange(H, device=p.device)[None, :, None]
        w = self.q_top[:, None, :].expand(B, H, T)
        self.top_all[layer] += torch.bincount(bins.reshape(-1), weights=w.reshape(-1), minlength=H * nb).view(H, nb).double()
        for j, o in enumerate(OFFSETS):
            d = p.diagonal(offset=o, dim1=2, dim2=3)  # [B, H, T-|o|]: query q -> key q+o
            self.off[layer, :, j] += (d * self.off_mask[j][:, None, :]).sum((0, 2)).double()
        qv = self.qv[:, None, :, None]
        self.kind[layer] += (torch.einsum("bhqk,bkn->bhqn", p, self.kinds) * qv).sum((0, 2)).double()
        pn = p * self.nonsink[:, None, None, :]
        r = pn.sum(-1)  # [B, H, q] non-sink mass
        use = self.range_q[:, None, :] & (r > 1e-4)
        rs = r.clamp(min=1e-12)
        dist = torch.einsum("bhqk,qk->bhq", pn, self.D) / rs
        plogp = torch.where(pn > 0, pn * torch.log(pn.clamp(min=1e-30)), 0.0).sum(-1)
        ent = -plogp / rs + torch.log(rs)
        entn = ent / self.logn[:, None, :].clamp(min=1e-12)
        u = use.double()
        self.dist[layer] += (dist.double() * u).sum((0, 2))
        self.udist[layer] += (self.udist_q[:, None, :].double() * u).sum((0, 2))
        self.ent[layer] += (ent.double() * u).sum((0, 2))
        self.entn[layer] += (entn.double() * u).sum((0, 2))
        self.n_range[layer] += u.sum((0, 2))
        if self.sem is not None:
            idx, bucket, s = self.sem
            a = p.transpose(0, 1).reshape(H, -1)[:, idx].double()  # [H, pairs]
            # idx indexes the flattened [B, q, k]; transpose(0,1) gives [H, B, q, k] -> same order
            self.sa[layer].index_add_(1, bucket, a)
            self.saa[layer].index_add_(1, bucket, a * a)
            self.sas[layer].index_add_(1, bucket, a * s[None])

    def frame(self) -> pd.DataFrame:
        L, H = self.L, self.H
        rows: dict[str, Any] = {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
        }
        top = (self.top / max(self.n_top, 1.0)).cpu().numpy().reshape(L * H, -1)
        off = (self.off / self.n_off.clamp(min=1)).cpu().numpy().reshape(L * H, -1)
        for j, o in enumerate(OFFSETS):
            rows[f"top_offset_{o:+d}"] = top[:, j]
        for j, o in enumerate(OFFSETS):
            rows[f"attn_offset_{o:+d}"] = off[:, j]
        rows["prev_token"] = off[:, OFFSETS.index(-1)]
        cand = [j for j, o in enumerate(OFFSETS) if o != 0]
        best = np.array(cand)[top[:, cand].argmax(1)]
        rows["positional_offset"] = np.array(OFFSETS)[best]
        rows["positional_share"] = top[np.arange(L * H), best]
        top_all = (self.top_all / max(self.n_top, 1.0)).cpu().numpy().reshape(L * H, -1)
        mode = top_all.argmax(1)
        rows["mode_offset"] = mode - MODE_MAX_OFFSET  # the most frequent argmax offset, any distance
        rows["mode_share"] = top_all[np.arange(L * H), mode]
        kind = (self.kind / max(self.n_q, 1.0)).cpu().numpy().reshape(L * H, -1)
        for j, k in enumerate(self.KINDS):
            rows["sink_first" if k == "first" else k] = kind[:, j]
        rows["sink"] = kind[:, :4].max(1)
        n = self.n_range.clamp(min=1)
        nan = (self.n_range == 0).cpu().numpy().reshape(-1)
        for name, t in (("mean_distance", self.dist / n), ("entropy", self.ent / n), ("entropy_norm", self.entn / n)):
            x = t.cpu().numpy().reshape(-1)
            x[nan] = np.nan
            rows[name] = x
        ratio = (self.dist / self.udist.clamp(min=1e-12)).cpu().numpy().reshape(-1)
        ratio[nan | (self.udist.cpu().numpy().reshape(-1) <= 0)] = np.nan
        rows["distance_ratio"] = ratio
        rows["semantic"] = self._semantic().reshape(-1)
        return pd.DataFrame(rows)

    def _semantic(self) -> np.ndarray:
        """Pooled within-offset correlation (offset fixed effects removed from both variables)."""
        if self.W_E is None:
            return np.full((self.L, self.H), np.nan)
        n = self.sn.clamp(min=1)
        keep = (self.sn >= 2).double()
        cov = ((self.sas - self.sa * self.ss / n) * keep).sum(-1)
        va = ((self.saa - self.sa**2 / n) * keep).sum(-1)
        vs = ((self.sss - self.ss**2 / n) * keep).sum()
        r = cov / torch.sqrt((va * vs).clamp(min=1e-300))
        r = torch.where((va > 1e-18) & (vs > 1e-18), r, torch.full_like(r, float("nan")))
        return r.cpu().numpy()


class RepeatStats(_Accumulator):
    """Induction / duplicate-token / previous-token / first-token attention on repeated random tokens."""

    def __init__(self, model: Any):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        f = dict(dtype=torch.float64, device=model.W_E.device)
        self.ind = torch.zeros(self.L, self.H, **f)
        self.dup = torch.zeros(self.L, self.H, **f)
        self.prev = torch.zeros(self.L, self.H, **f)
        self.first = torch.zeros(self.L, self.H, **f)
        self.n_second = 0.0
        self.n_rest = 0.0
        self.n_seqs = 0

    def begin(self, batch: TokenBatch) -> None:
        if batch.repeat is None:
            raise InterpError("RepeatStats needs repeated-random-token batches (see random_batches).")
        start, n = batch.repeat
        B, T = batch.tokens.shape
        self.q2 = torch.arange(start + n, start + 2 * n)
        self.T = T
        self.n = n
        self.n_second += B * n
        self.n_rest += B * (T - 1)
        self.n_seqs += B

    def update(self, layer: int, pattern: torch.Tensor) -> None:
        p = pattern.float()
        q2 = self.q2.to(p.device)
        n = self.n
        self.ind[layer] += p[:, :, q2, q2 - n + 1].sum((0, 2)).double()
        self.dup[layer] += p[:, :, q2, q2 - n].sum((0, 2)).double()
        self.prev[layer] += p.diagonal(offset=-1, dim1=2, dim2=3).sum((0, 2)).double()
        self.first[layer] += p[:, :, 1:, 0].sum((0, 2)).double()

    def frame(self) -> pd.DataFrame:
        L, H = self.L, self.H
        d = lambda t, n: (t / max(n, 1.0)).cpu().numpy().reshape(-1)  # noqa: E731
        return pd.DataFrame({
            "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
            "induction": d(self.ind, self.n_second), "duplicate": d(self.dup, self.n_second),
            "rand_prev_token": d(self.prev, self.n_rest), "rand_first": d(self.first, self.n_rest),
        })


class SyntaxStats(_Accumulator):
    """Clark et al. (2019) word-level dependency accuracy per (relation, direction, head)."""

    def __init__(self, model: Any, relations: RelationIndex):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.relations = relations
        self.device = model.W_E.device
        self.causal = _is_causal(model)
        self.cap = 64
        self.hits = torch.zeros(self.L, self.cap, self.H, dtype=torch.float64, device=self.device)
        self.n = torch.zeros(self.cap, dtype=torch.float64, device=self.device)
        self.base = torch.zeros(self.cap, len(OFFSETS), dtype=torch.float64, device=self.device)
        self.n_pairs = 0

    def _grow(self, groups: int) -> None:
        if groups <= self.cap:
            return
        new = max(groups, 2 * self.cap)
        pad = new - self.cap
        self.hits = torch.cat([self.hits, self.hits.new_zeros(self.L, pad, self.H)], 1)
        self.n = torch.cat([self.n, self.n.new_zeros(pad)])
        self.base = torch.cat([self.base, self.base.new_zeros(pad, len(OFFSETS))])
        self.cap = new

    def begin(self, batch: TokenBatch) -> None:
        if batch.piece2word is None or batch.pairs is None:
            raise InterpError("SyntaxStats needs parsed batches (see sentence_batches).")
        p2w = batch.piece2word.to(self.device)
        W = int(batch.n_words.max()) if batch.n_words is not None and len(batch.n_words) else 1
        W = max(W, 1)
        M = torch.nn.functional.one_hot((p2w + 1).clamp(min=0), W + 1)[..., 1:].float()  # [B, T, W]
        M = M * (p2w >= 0)[..., None]
        counts = M.sum(1)  # [B, W] pieces per word
        self.M = M
        self.Mq = (M / counts.clamp(min=1)[:, None, :]).transpose(1, 2)  # [B, W, T]: mean over query pieces
        ok = counts > 0
        self.key_bad = ~ok[:, None, :] | torch.eye(W, dtype=torch.bool, device=self.device)[None]  # [B, q, k]
        pairs = batch.pairs.to(self.device)
        self.pairs = pairs
        if len(pairs):
            self._grow(int(pairs[:, 3].max()) + 1)
            g = pairs[:, 3]
            self.n.index_add_(0, g, torch.ones(len(g), dtype=torch.float64, device=self.device))
            off = pairs[:, 2] - pairs[:, 1]
            for j, o in enumerate(OFFSETS):
                if o != 0:
                    self.base[:, j].index_add_(0, g, (off == o).double())
            self.n_pairs += len(pairs)

    def update(self, layer: int, pattern: torch.Tensor) -> None:
        if not len(self.pairs):
            return
        p = pattern.float()
        pw = self.Mq[:, None] @ (p @ self.M[:, None])  # [B, H, W, W]: rows averaged, columns summed
        pw = pw.masked_fill(self.key_bad[:, None], float("-inf"))
        pred = pw.argmax(-1)  # [B, H, W]
        b, q, t, g = self.pairs.unbind(1)
        correct = (pred[b, :, q] == t[:, None]).double()  # [P, H]
        self.hits[layer].index_add_(0, g, correct)

    def frame(self) -> pd.DataFrame:
        G = len(self.relations.names) * 2
        n = self.n[:G].cpu().numpy()
        hits = self.hits[:, :G].cpu().numpy()  # [L, G, H]
        base = self.base[:G].cpu().numpy()  # [G, O]
        allowed = [j for j, o in enumerate(OFFSETS) if o != 0 and (o < 0 or not self.causal)]
        groups = [g for g in range(G) if n[g] > 0]
        cols = ["relation", "direction", "layer", "head", "accuracy", "baseline_accuracy", "baseline_offset", "n"]
        if not groups:
            return pd.DataFrame(columns=[*cols, "margin"])
        L, H = self.L, self.H
        gi = np.repeat(np.array(groups), L * H)
        j = np.array(allowed)[base[groups][:, allowed].argmax(1)]  # best fixed offset per group
        jb = dict(zip(groups, j, strict=True))
        df = pd.DataFrame({
            "relation": [self.relations.names[g // 2] for g in gi],
            "direction": [DIRECTIONS[g % 2] for g in gi],
            "layer": np.tile(np.repeat(np.arange(L), H), len(groups)),
            "head": np.tile(np.arange(H), L * len(groups)),
            "accuracy": (hits[:, groups, :].transpose(1, 0, 2) / n[groups][:, None, None]).reshape(-1),
            "baseline_accuracy": np.array([base[g, jb[g]] / n[g] for g in gi]),
            "baseline_offset": np.array([OFFSETS[jb[g]] for g in gi]),
            "n": n[gi].astype(int),
        })
        df["margin"] = df["accuracy"] - df["baseline_accuracy"]
        return df


# =========================================================================== driver


def _check_model(model: Any) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise InterpError("The head taxonomy needs an interp.HookedTransformer (decoder or encoder); "
                          f"got {type(model).__name__}.")


def _layers(model: Any, layers: Iterable[int] | None) -> list[int]:
    n = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n))
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise InterpError(f"Layer {bad[0]} is out of range: the model has {n} layers (0-{n - 1}).")
    return out


def scan(model: Any, batches: Iterable[TokenBatch], accumulators: list[_Accumulator], *,
         layers: Iterable[int] | None = None, progress: Progress | None = None, desc: str = "", total: int | None = None) -> int:
    """Run ``model`` over ``batches`` with hooks on ``blocks.{l}.attn.hook_pattern`` that hand
    each pattern to every accumulator and keep nothing. Returns the number of batches.

    Only the hooked layers run the eager kernel (the core's auto kernel), and the forward
    stops before the unembedding (``return_type=None``).
    """
    _check_model(model)
    layer_ids = _layers(model, layers)

    def hook_for(layer: int) -> Callable:
        def fn(pattern: torch.Tensor, hook: Any) -> None:
            for acc in accumulators:
                acc.update(layer, pattern.detach())
        return fn

    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook_for(layer)) for layer in layer_ids]
    it = batches if progress is None else progress(batches, desc=desc, total=total)
    count = 0
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for batch in it:
            for acc in accumulators:
                acc.begin(batch)
            mask = None if bool(batch.valid.all()) else batch.valid.long().to(model.W_E.device)
            model(batch.tokens.to(model.W_E.device), attention_mask=mask, return_type=None)
            count += 1
    return count


# =========================================================================== weights


def copying_scores(model: Any) -> pd.DataFrame:
    """OV copying score per head: sum(eig) / sum(|eig|) of the full OV circuit W_E W_V W_O W_U.

    Elhage et al. 2021 / Olsson et al. 2022 read the eigenvalues of the token -> logit OV
    circuit: positive real eigenvalues mean the head raises the logit of the token it attends
    to (copying). The [vocab, vocab] product has the same non-zero spectrum as the cyclic
    [d_head, d_head] product W_O g_f W_U W_E g_1 W_V (g: the gains of ln1 and ln_final, folded
    in; normalisation's centring and scale are ignored, as in the paper's attention-only
    models), which is what is computed. NaN when the model has no unembedding (e.g. MiniLM) or
    a nonlinear MLM head between the residual and the vocabulary.
    """
    _check_model(model)
    cfg = model.cfg
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    out = np.full((L, H), np.nan)
    if cfg.has_unembed and hasattr(model, "unembed") and not hasattr(model, "mlm_head"):
        with torch.no_grad():
            W_E = model.W_E.detach().float()
            W_U = model.W_U.detach().float()
            lnf = getattr(model, "ln_final", None)
            gf = lnf.w.detach().float() if lnf is not None and hasattr(lnf, "w") else torch.ones(cfg.d_model, device=W_E.device)
            G = (gf[:, None] * W_U[:, : W_E.shape[0]]) @ W_E  # [d_model, d_model] = g_f W_U W_E
            group = H // int(cfg.n_kv_heads)
            for layer, block in enumerate(model.blocks):
                ln1 = getattr(block, "ln1", None)
                pre = cfg.norm_placement == "pre" and ln1 is not None and hasattr(ln1, "w")
                g1 = ln1.w.detach().float() if pre else torch.ones(cfg.d_model, device=W_E.device)
                Gl = G * g1[None, :]
                W_V, W_O = block.attn.W_V.detach().float(), block.attn.W_O.detach().float()
                for h in range(H):
                    M = W_O[h] @ Gl @ W_V[h // group]  # [d_head, d_head]
                    ev = torch.linalg.eigvals(M.double())
                    denom = float(ev.abs().sum())
                    out[layer, h] = float(ev.sum().real) / denom if denom > 0 else np.nan
    return pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L), "copying": out.reshape(-1)})


# =========================================================================== labels


def _best_syntax(syntax: pd.DataFrame | None, th: Thresholds) -> pd.DataFrame | None:
    """Per head, the (relation, direction) with the largest margin among well-sampled ones."""
    if syntax is None or not len(syntax):
        return None
    s = syntax[(syntax["n"] >= th.syntax_min_n) & ~syntax["relation"].isin(NOT_SYNTACTIC)]
    if not len(s):
        return None
    return s.loc[s.groupby(["layer", "head"])["margin"].idxmax()].set_index(["layer", "head"])


def _rules(r: Any, sx: Any, th: Thresholds) -> list[tuple[str, float, float]]:
    """Every rule's (label, confidence, strength); strength >= 1 means the rule holds.

    Strength is the score over its threshold (or threshold over score for "at most" rules),
    so rules of different units compare on one scale for the unclassified confidence."""
    out: list[tuple[str, float, float]] = []

    def add(label: str, value: float, threshold: float, conf: float | None = None, above: bool = True) -> None:
        if value is None or not np.isfinite(value):
            return
        strength = value / threshold if above else (threshold / value if value > 0 else np.inf)
        out.append((label, float(value if conf is None else conf), float(strength)))

    g = lambda name: float(getattr(r, name, np.nan))  # noqa: E731
    ind, copying = g("induction"), g("copying")
    # Olsson et al. define induction heads by prefix matching *and* copying: without copying
    # (copying score <= 0 where it can be measured) the label stays, at half the confidence
    add("induction", ind, th.induction, ind * 0.5 if np.isfinite(copying) and copying <= 0 else ind)
    add("duplicate-token", g("duplicate"), th.duplicate)
    prev = np.nanmax([g("prev_token"), g("rand_prev_token"), -np.inf])
    pos_off, pos_share = g("positional_offset"), g("positional_share")
    prev_share = pos_share if pos_off == -1 else 0.0
    strength = max(prev_share / th.positional, prev / th.prev_token)
    if np.isfinite(strength):
        out.append(("previous-token", float(max(prev_share, prev)), float(strength)))
    if pos_off != -1:
        add("positional", pos_share, th.positional)
    if sx is not None:
        acc, base, n = float(sx["accuracy"]), float(sx["baseline_accuracy"]), float(sx["n"])
        se = math.sqrt(max(acc * (1 - acc) + base * (1 - base), 1.0 / n) / n)
        strength = min(float(sx["margin"]) / th.syntax_margin, float(sx["margin"]) / se / th.syntax_z)
        out.append((f"syntactic:{sx['relation']}", acc, strength))
    add("semantic", g("semantic"), th.semantic)
    add("sink", g("sink"), th.sink)
    ratio, entn = g("distance_ratio"), g("entropy_norm")
    if np.isfinite(entn) and entn < th.uniform:
        add("local", ratio, th.local, 1.0 - ratio, above=False)
        add("long-range", ratio, th.long_range, min(1.0, ratio / (2 * th.long_range)))
    add("uniform", entn, th.uniform)
    return out


def _label_rows(df: pd.DataFrame, syntax: pd.DataFrame | None, th: Thresholds) -> pd.DataFrame:
    best = _best_syntax(syntax, th)
    labels, confs, crits = [], [], []
    sx_cols: dict[str, list] = {"syntax_relation": [], "syntax_direction": [], "syntax_accuracy": [],
                                "syntax_baseline": [], "syntax_margin": []}
    for r in df.itertuples(index=False):
        sx = best.loc[(r.layer, r.head)] if best is not None and (r.layer, r.head) in best.index else None
        rules = _rules(r, sx, th)
        fired = [x for x in rules if x[2] >= 1.0]
        if fired:
            labels.append(fired[0][0])
            confs.append(round(float(np.clip(fired[0][1], 0, 1)), 6))
        else:
            labels.append("unclassified")
            confs.append(round(float(np.clip(1.0 - max((x[2] for x in rules), default=0.0), 0, 1)), 6))
        crits.append(";".join(x[0] for x in fired))
        sx_cols["syntax_relation"].append(sx["relation"] if sx is not None else "")
        sx_cols["syntax_direction"].append(sx["direction"] if sx is not None else "")
        sx_cols["syntax_accuracy"].append(float(sx["accuracy"]) if sx is not None else np.nan)
        sx_cols["syntax_baseline"].append(float(sx["baseline_accuracy"]) if sx is not None else np.nan)
        sx_cols["syntax_margin"].append(float(sx["margin"]) if sx is not None else np.nan)
    out = df.copy()
    out.insert(2, "label", labels)
    out.insert(3, "confidence", confs)
    out.insert(4, "criteria", crits)
    for k, v in sx_cols.items():
        out[k] = v
    return out


def classify(heads: pd.DataFrame, syntax: pd.DataFrame | None = None, thresholds: Thresholds = THRESHOLDS) -> pd.DataFrame:
    """Add ``label``, ``confidence``, ``criteria`` and the best syntactic relation to a heads frame.

    Rules are tried in order of specificity (module docstring); a head gets the first that
    holds, never a forced label: ``unclassified`` when none does.
    """
    for col in ("label", "confidence", "criteria"):
        if col in heads.columns:
            heads = heads.drop(columns=col)
    return _label_rows(heads.reset_index(drop=True), syntax, thresholds)


# =========================================================================== tables


def syntax_table(syntax: pd.DataFrame, relations: Iterable[str] = RELATIONS) -> pd.DataFrame:
    """Best head per relation (over both directions) against its fixed-offset baseline.

    Columns: relation, direction, layer, head, accuracy, baseline_accuracy, baseline_offset, n,
    margin; relations absent from the parse get a row of NaN with n = 0.
    """
    rows = []
    for rel in relations:
        s = syntax[syntax["relation"] == rel] if len(syntax) else syntax
        if not len(s):
            rows.append({"relation": rel, "direction": "", "layer": np.nan, "head": np.nan, "accuracy": np.nan,
                         "baseline_accuracy": np.nan, "baseline_offset": np.nan, "n": 0, "margin": np.nan})
            continue
        r = s.loc[s["accuracy"].idxmax()]
        rows.append({k: r[k] for k in ("relation", "direction", "layer", "head", "accuracy", "baseline_accuracy",
                                       "baseline_offset", "n", "margin")})
    return pd.DataFrame(rows)


def layer_table(heads: pd.DataFrame) -> pd.DataFrame:
    """Mean over heads, per layer, of the attention shares to sinks and delimiters."""
    cols = [c for c in ("sink_first", "bos", "cls", "sep", "special", "punct", "rand_first", "entropy_norm", "mean_distance")
            if c in heads.columns]
    return heads.groupby("layer", as_index=False)[cols].mean()


# =========================================================================== one call


@dataclass
class HeadAnalysis:
    """What :func:`analyze` returns: tidy frames and what they were computed on."""

    heads: pd.DataFrame  # one row per (layer, head): label, confidence, criteria, every score
    syntax: pd.DataFrame  # relation, direction, layer, head, accuracy, baseline_accuracy, baseline_offset, n, margin
    best_syntax: pd.DataFrame  # syntax_table(syntax)
    layers: pd.DataFrame  # layer_table(heads)
    info: dict = field(default_factory=dict)


def induction_scores(model: Any, *, n_seqs: int = 64, half_len: int | None = None, batch_size: int = 16, seed: int = 0,
                     vocab: VocabInfo | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """Per-head prefix matching, duplicate-token, previous- and first-token attention on
    repeated random tokens (Olsson et al. 2022), see :func:`random_batches`."""
    _check_model(model)
    acc = RepeatStats(model)
    scan(model, random_batches(model, n_seqs=n_seqs, half_len=half_len, batch_size=batch_size, seed=seed, vocab=vocab),
         [acc], progress=progress, desc="repeated random tokens", total=math.ceil(n_seqs / batch_size))
    return acc.frame()


def analyze(model: Any, *, sentences: Iterable[Sentence] | None = None, texts: Iterable[str] | None = None,
            n_random: int = 64, half_len: int | None = None, batch_size: int = 16, max_tokens: int | None = None,
            seed: int = 0, semantic: bool = True, thresholds: Thresholds = THRESHOLDS,
            progress: Progress | None = None) -> HeadAnalysis:
    """Score and label every head of ``model``.

    ``sentences`` (parsed, e.g. :func:`analyses.parses.read_conllu`) give the token-level and
    the syntactic scores; ``texts`` (plain) give only the token-level ones; with neither, the
    token-level scores come from the repeated random tokens (all a model without a text
    tokenizer can read). Repeated random tokens always give the induction scores. Everything
    streams: memory is independent of the corpus size.
    """
    _check_model(model)
    if model.cfg.architecture == "encoder_decoder":
        raise InterpError("The head taxonomy covers decoder and encoder models, not encoder-decoder ones.")
    if n_random < 1:
        raise InterpError(f"n_random must be >= 1, got {n_random}.")
    vocab = VocabInfo.from_model(model)
    info: dict[str, Any] = {}
    rel = RelationIndex()
    tok_acc = TokenStats(model, vocab, semantic=semantic)
    syn_acc = None
    if sentences is not None:
        syn_acc = SyntaxStats(model, rel)
        n = scan(model, sentence_batches(model, sentences, batch_size=batch_size, max_tokens=max_tokens, relations=rel),
                 [tok_acc, syn_acc], progress=progress, desc="parsed sentences")
        if n == 0:
            raise InterpError("The text holds no sentences to analyse; pass a non-empty --text or --conllu file.")
        info.update(source="parsed sentences", n_pairs=syn_acc.n_pairs)
    elif texts is not None:
        n = scan(model, token_batches(model, texts, batch_size=batch_size, max_tokens=max_tokens), [tok_acc],
                 progress=progress, desc="text")
        if n == 0:
            raise InterpError("The text is empty; pass a file with some text in it.")
        info.update(source="text")
    rep_acc = RepeatStats(model)
    accs: list[_Accumulator] = [rep_acc] if (sentences is not None or texts is not None) else [rep_acc, tok_acc]
    scan(model, random_batches(model, n_seqs=n_random, half_len=half_len, batch_size=batch_size, seed=seed, vocab=vocab),
         accs, progress=progress, desc="repeated random tokens", total=math.ceil(n_random / batch_size))
    if sentences is None and texts is None:
        info.update(source="repeated random tokens")
    info.update(n_tokens=tok_acc.n_tokens, n_sequences=tok_acc.n_seqs, n_random=rep_acc.n_seqs, random_half_len=rep_acc.n)
    heads = tok_acc.frame().merge(rep_acc.frame(), on=["layer", "head"]).merge(copying_scores(model), on=["layer", "head"])
    syntax = syn_acc.frame() if syn_acc is not None else pd.DataFrame(
        columns=["relation", "direction", "layer", "head", "accuracy", "baseline_accuracy", "baseline_offset", "n", "margin"])
    heads = classify(heads, syntax, thresholds)
    info["thresholds"] = dataclasses.asdict(thresholds)
    return HeadAnalysis(heads=heads, syntax=syntax, best_syntax=syntax_table(syntax) if len(syntax) else syntax_table(syntax.iloc[0:0]),
                        layers=layer_table(heads), info=info)


def compare(models: Mapping[str, Any], **kwargs: Any) -> pd.DataFrame:
    """:func:`analyze` each model (same inputs, same seed) and stack the heads frames with a
    ``model`` column: the side-by-side taxonomy of, e.g., one task trained under sinusoidal,
    learned, RoPE and ALiBi positions."""
    if not models:
        raise InterpError("compare needs at least one model.")
    frames = []
    for name, model in models.items():
        h = analyze(model, **kwargs).heads
        h.insert(0, "model", name)
        h.insert(1, "positional_encoding", model.cfg.positional)
        frames.append(h)
    return pd.concat(frames, ignore_index=True)
