"""Text files as a domain stream: file i is domain i, sequences taken round-robin.

Text -> ids is :func:`interp.tokenize.encode` (the tokenizer's ids, or UTF-8 bytes for a model
without one), the BOS rule is :func:`interp.tokenize.bos_to_prepend`, and rows are padded by
:func:`interp.tokenize.pad_batch`. What is particular here is the stream: each file is read
block by block (a large file is never held in memory) and the files take turns, so every batch
mixes domains.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from interp import HookedTransformer, tokenize
from interp.errors import InterpError

__all__ = ["text_batches"]


def _text_ids(model: HookedTransformer, path: Any, block_chars: int = 1 << 16
              ) -> Iterator[list[int]]:
    """Token ids of a text file, tokenised block by block (split at line ends), so a large file
    is never held in memory. A model without a tokenizer reads UTF-8 bytes (d_vocab >= 256)."""
    if model.tokenizer is None and model.cfg.d_vocab < 256:
        raise InterpError(f"The model has no tokenizer and d_vocab={model.cfg.d_vocab} < 256, so "
                          "text cannot be fed to it as bytes; use --domains or a model with a "
                          "tokenizer.")
    try:
        fh = open(path, encoding="utf-8")  # closed in the finally below (a generator)
    except FileNotFoundError:
        raise InterpError(f"Text file not found: {path}.") from None
    try:
        buf = ""
        while True:
            try:
                chunk = fh.read(block_chars)
            except UnicodeDecodeError:
                raise InterpError(f"Text file {path} is not UTF-8 text.") from None
            if not chunk:
                break
            buf += chunk
            cut = buf.rfind("\n")
            if cut < 0:
                continue
            part, buf = buf[:cut + 1], buf[cut + 1:]
            yield tokenize.encode(model, part, specials=False)
        if buf:
            yield tokenize.encode(model, buf, specials=False)
    finally:
        fh.close()


def text_batches(model: HookedTransformer, paths: Sequence[Any], *, seq_len: int = 128,
                 batch_size: int = 8,
                 max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Sequences of ``seq_len`` tokens from text files, file i = domain i, taken round-robin so
    every batch mixes domains; yields ``(tokens [batch, pos], domain_ids [batch])`` (a last
    short batch also carries its attention mask). Decoders get the tokenizer's BOS first
    (:func:`interp.tokenize.bos_to_prepend`). Stops when every file is used up or after
    ``max_tokens`` tokens. Missing or empty files fail at once."""
    if not paths:
        raise InterpError("No text files given.")
    for p in paths:
        if not os.path.isfile(p):
            raise InterpError(f"Text file not found: {p}.")
        if os.path.getsize(p) == 0:
            raise InterpError(f"Text file {p} is empty; give files with some text.")
    return _round_robin(model, list(paths), seq_len, batch_size, max_tokens)


def _round_robin(model: HookedTransformer, paths: list[Any], seq_len: int, batch_size: int,
                 max_tokens: int | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The stream behind :func:`text_batches`: one sequence per live file per turn; a file
    shorter than one sequence gives one shorter sequence (if it has two tokens or more)."""
    seq_len = min(seq_len, model.cfg.n_ctx)
    bos = tokenize.bos_to_prepend(model)
    head = [bos] if bos is not None else []
    body = seq_len - len(head)
    if body < 1:
        raise InterpError(f"seq_len {seq_len} leaves no room for text after the BOS token.")
    streams = [_text_ids(model, p) for p in paths]
    bufs: list[list[int]] = [[] for _ in paths]
    used = [0] * len(paths)
    live = list(range(len(paths)))
    rows: list[list[int]] = []
    doms: list[int] = []
    emitted = 0
    while live and (max_tokens is None or emitted < max_tokens):
        for d in list(live):
            while len(bufs[d]) < body:
                nxt = next(streams[d], None)
                if nxt is None:
                    break
                bufs[d].extend(nxt)
            if len(bufs[d]) < body:
                live.remove(d)
                if used[d] or len(bufs[d]) < 2:
                    continue
                row = head + bufs[d]  # a text shorter than one sequence: use it whole
            else:
                row = head + bufs[d][:body]
                bufs[d] = bufs[d][body:]
            rows.append(row)
            doms.append(d)
            used[d] += 1
            emitted += len(row)
            if len(rows) == batch_size:
                yield _pack(rows, doms)
                rows, doms = [], []
            if max_tokens is not None and emitted >= max_tokens:
                break
    if rows:
        yield _pack(rows, doms)


def _pack(rows: list[list[int]], doms: list[int]) -> tuple[torch.Tensor, ...]:
    """(tokens, domain_ids), plus the attention mask when the rows differ in length (padding
    id 0: padded positions are masked)."""
    batch = tokenize.pad_batch(rows, pad_id=0)
    dom = torch.tensor(doms, dtype=torch.long)
    if bool((batch.lengths == batch.tokens.shape[1]).all()):
        return batch.tokens, dom
    return batch.tokens, dom, batch.attention_mask
