"""Text -> token ids -> padded batches: the one place that decides BOS, specials, truncation,
padding and token budgets, so every analysis feeds a model the same way.

The rules, in one place:

- **BOS** (:func:`bos_to_prepend`): a decoder gets its tokenizer's BOS first iff
  ``model.prepend_bos`` (= ``model.cfg.default_prepend_bos``; loaders set it from the
  checkpoint, :func:`tokenizer_adds_bos` for a Hugging Face tokenizer; decoders built from a
  config default to True) and the tokenizer has one; never twice. ``prepend_bos=`` overrides
  it for one call. Encoders get their tokenizer's own specials ([CLS] ... [SEP]).
- **No tokenizer**: the text's UTF-8 bytes are the token ids (a random model built from a
  config can still read text), which needs ``d_vocab >= 256``.
- **Padding** (:func:`pad_batch`): right by default, with an explicit pad id; the boolean
  ``attention_mask`` (True = token) and the ``lengths`` travel with the tokens.
- **Sequences**: :func:`batches` cuts each text into consecutive pieces of ``seq_len`` (or keeps
  only the first piece) and streams padded batches under a token budget; :func:`windows` frames
  every window of one long text with the specials (fixed-length sequences for loss
  comparisons).

``encode(model, text)`` is what ``model.to_tokens(text, truncate=False)[0]`` gives. Nothing
here imports :mod:`interp.model` (only its type, for hints), so the core may use it too.

>>> from interp.tokenize import pad_batch
>>> b = pad_batch([[5, 6, 7], [8]], pad_id=0)
>>> b.tokens.tolist(), b.attention_mask.tolist(), b.lengths.tolist()
([[5, 6, 7], [8, 0, 0]], [[True, True, True], [True, False, False]], [3, 1])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from interp.errors import InterpError

if TYPE_CHECKING:  # hints only: interp.model may use this module, so no runtime import of it
    from jaxtyping import Bool, Int

    from interp.model import HookedEncoderDecoder, HookedTransformer

    Model = HookedTransformer | HookedEncoderDecoder

__all__ = [
    "TokenBatch",
    "batches",
    "bos_to_prepend",
    "encode",
    "frame",
    "pad_batch",
    "pad_id",
    "positions_from_mask",
    "text_batch",
    "tokenizer_adds_bos",
    "windows",
]


@dataclass(frozen=True)
class TokenBatch:
    """Padded token ids with their mask and lengths (all on one device)."""

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Bool[torch.Tensor, "batch pos"]  # True = a real token, False = padding
    lengths: Int[torch.Tensor, " batch"]

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str | None) -> TokenBatch:
        """The same batch on ``device``."""
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device),
                          self.lengths.to(device))


# --------------------------------------------------------------------------------- rules


def tokenizer_adds_bos(tok: object) -> bool:
    """Whether ``tok`` itself puts its BOS first when asked for its special tokens: the
    checkpoint's own rule (a Hugging Face tokenizer's ``add_bos_token`` from
    tokenizer_config.json, or a ``tokenizer.json`` post-processor that adds it). Asked of the
    tokenizer by encoding a probe text both ways, so every tokenizer class answers the same way
    ``tok(text, add_special_tokens=True)`` behaves. False without a BOS id."""
    bos = getattr(tok, "bos_token_id", None)
    if tok is None or bos is None:
        return False
    probe = "a b"
    try:
        plain = list(tok.encode(probe, add_special_tokens=False))
        full = list(tok.encode(probe, add_special_tokens=True))
    except Exception:  # a word vocabulary without "a": ask with an empty text instead
        plain, full = [], list(tok.encode("", add_special_tokens=True))
    return bool(full) and full[0] == bos and not (plain and plain[0] == bos)


def bos_to_prepend(model: Model, prepend_bos: bool | None = None) -> int | None:
    """The BOS id a decoder puts first: the tokenizer's, iff ``prepend_bos`` (None: the model's
    rule, ``model.prepend_bos`` = ``model.cfg.default_prepend_bos``, which loaders take from the
    checkpoint's tokenizer); None for encoders, models without a tokenizer, and tokenizers
    without a BOS."""
    tok = model.tokenizer
    if model.cfg.architecture != "decoder" or tok is None:
        return None
    bos = getattr(tok, "bos_token_id", None)
    use = model.prepend_bos if prepend_bos is None else prepend_bos
    return bos if bos is not None and use else None


def frame(model: Model) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a sequence of text tokens: decoders ``[BOS]`` (see
    :func:`bos_to_prepend`) and nothing; encoders their tokenizer's ``[CLS]`` and ``[SEP]``
    where it has them; nothing at all without a tokenizer."""
    tok = model.tokenizer
    if tok is None:
        return [], []
    if model.cfg.architecture == "decoder":
        bos = bos_to_prepend(model)
        return ([bos] if bos is not None else []), []
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    return ([cls] if cls is not None else []), ([sep] if sep is not None else [])


def pad_id(model: Model) -> int:
    """The tokenizer's pad id, else 0 (padded positions are masked, so any id works)."""
    tok = model.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return 0 if pad is None else int(pad)


def _bytes(model: Model, text: str) -> list[int]:
    if model.cfg.d_vocab < 256:
        raise InterpError(f"The model has no tokenizer and d_vocab={model.cfg.d_vocab} < 256, so "
                          "text cannot be fed to it as bytes; pass token ids, or use a model "
                          "with a tokenizer.")
    return list(text.encode("utf-8"))


def encode(model: Model, text: str, *, specials: bool = True,
           prepend_bos: bool | None = None) -> list[int]:
    """Token ids of one text.

    ``specials=True``: as the model reads a text on its own (``model.to_tokens(text,
    truncate=False)[0]``): decoders with BOS first by :func:`bos_to_prepend` (not doubled when
    the tokenizer already put it there), encoders with their tokenizer's specials.
    ``specials=False``: the text's own ids only (callers add :func:`frame` per window). Without
    a tokenizer: the UTF-8 bytes either way. ``prepend_bos`` overrides the model's BOS rule
    (decoders only; False also drops a BOS the tokenizer put there itself).
    """
    tok = model.tokenizer
    if tok is None:
        return _bytes(model, text)
    if not specials:
        return [int(i) for i in tok.encode(text, add_special_tokens=False)]
    decoder = model.cfg.architecture == "decoder"
    ids = [int(i) for i in tok.encode(text, add_special_tokens=not decoder)]
    bos = bos_to_prepend(model, prepend_bos)
    if bos is not None and not (ids and ids[0] == bos):
        ids = [bos, *ids]
    return ids


def text_batch(model: Model, texts: str | Sequence[str], *, prepend_bos: bool | None = None,
               padding_side: Literal["right", "left"] | None = None,
               truncate: bool = True) -> TokenBatch:
    """Texts as the model reads them (:func:`encode` each), padded into one :class:`TokenBatch`
    with the exact mask of real tokens: what ``to_tokens``, ``forward(str)`` and
    ``generate(str)`` share. ``truncate`` keeps each text's first ``cfg.n_ctx`` tokens (every
    position scheme: ``n_ctx`` is the context the model was built for). ``padding_side``
    defaults to the tokenizer's (right without one)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items or any(not isinstance(t, str) for t in items):
        raise InterpError("Text input must be a string or a non-empty list of strings.")
    side = padding_side or getattr(model.tokenizer, "padding_side", None) or "right"
    if side not in ("right", "left"):
        raise InterpError(f"padding_side must be 'right' or 'left', got {side!r}.")
    rows = [encode(model, t, prepend_bos=prepend_bos) for t in items]
    if truncate:
        rows = [r[: model.cfg.n_ctx] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise InterpError("A text produced no tokens; pass non-empty text.")
    return pad_batch(rows, pad_id=pad_id(model), side=side)


def positions_from_mask(mask: Bool[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """Each token's position counted over real tokens only: a row's first real token is
    position 0 whatever padding precedes it (left padding), as a prompt run alone. Padded
    slots get the position of the real token before them (0 before any), a valid index whose
    value never reaches a real token (they are masked)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_batch(seqs: Sequence[Sequence[int]], *, pad_id: int = 0,
              side: Literal["right", "left"] = "right") -> TokenBatch:
    """Sequences of ids -> one :class:`TokenBatch` padded to the longest (on the CPU)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise InterpError("pad_batch needs at least one sequence and no empty ones.")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        tokens[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = True
    return TokenBatch(tokens, mask, torch.tensor([len(s) for s in seqs], dtype=torch.long))


# ----------------------------------------------------------------------------- sequences


def windows(ids: Sequence[int], seq_len: int, head: Sequence[int] = (),
            tail: Sequence[int] = ()) -> list[list[int]]:
    """Non-overlapping windows of one text's ids, each framed ``head + window + tail`` to
    ``seq_len`` tokens; the remainder shorter than a window is dropped, except that a text
    shorter than one window gives one shorter sequence (the whole text)."""
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise InterpError(f"seq_len {seq_len} leaves no room for text after the special tokens.")
    body = min(body, len(ids))
    if body < 1:
        return []
    return [[*head, *ids[i:i + body], *tail] for i in range(0, len(ids) - body + 1, body)]


def _pieces(model: Model, texts: Iterable[str], seq_len: int, split: bool) -> Iterator[list[int]]:
    for text in texts:
        if not text.strip():
            continue
        ids = encode(model, text)
        if not split:
            yield ids[:seq_len]
            continue
        for i in range(0, len(ids), seq_len):
            yield ids[i:i + seq_len]


def batches(model: Model, texts: Iterable[str], *, batch_size: int, seq_len: int,
            max_tokens: int | None = None, split: bool = True, min_len: int = 1,
            pad: int = 0, side: Literal["right", "left"] = "right",
            budget: Literal["batch", "exact"] = "batch") -> Iterator[TokenBatch]:
    """Stream texts as padded :class:`TokenBatch` es of ``batch_size`` sequences (CPU).

    Each non-blank text is :func:`encode` d, then cut into consecutive pieces of ``seq_len``
    (``split``; only the first piece carries BOS / [CLS], only the last [SEP]) or cut to its
    first ``seq_len`` tokens (not ``split``); pieces shorter than ``min_len`` are skipped.
    ``max_tokens`` bounds the tokens read: ``budget="batch"`` yields whole batches while fewer
    than ``max_tokens`` tokens came before (shapes stay ``batch_size``), ``budget="exact"`` cuts
    the last sequence so exactly ``max_tokens`` tokens come out. Memory: one batch.
    """
    if budget == "exact":
        yield from _exact(model, texts, batch_size, seq_len, max_tokens, split, min_len, pad, side)
        return
    rows: list[list[int]] = []
    seen = 0
    for ids in _pieces(model, texts, seq_len, split):
        if len(ids) < min_len:
            continue
        rows.append(ids)
        if len(rows) == batch_size:
            if max_tokens is not None and seen >= max_tokens:
                return
            yield pad_batch(rows, pad_id=pad, side=side)
            seen += sum(len(r) for r in rows)
            rows = []
    if rows and (max_tokens is None or seen < max_tokens):
        yield pad_batch(rows, pad_id=pad, side=side)


def _exact(model: Model, texts: Iterable[str], batch_size: int, seq_len: int,
           max_tokens: int | None, split: bool, min_len: int, pad: int,
           side: Literal["right", "left"]) -> Iterator[TokenBatch]:
    """:func:`batches` with a token-exact budget (the last sequence is cut to fit)."""
    seen, rows = 0, []
    for piece in _pieces(model, texts, seq_len, split):
        ids = piece
        if max_tokens is not None and seen + len(ids) > max_tokens:
            ids = ids[:max(0, max_tokens - seen)]
        if len(ids) < min_len:
            if max_tokens is not None and seen >= max_tokens:
                break
            continue
        rows.append(ids)
        seen += len(ids)
        if len(rows) == batch_size:
            yield pad_batch(rows, pad_id=pad, side=side)
            rows = []
        if max_tokens is not None and seen >= max_tokens:
            break
    if rows:
        yield pad_batch(rows, pad_id=pad, side=side)
