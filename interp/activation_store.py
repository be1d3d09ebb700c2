"""Hook activations streamed to sharded files on disk, and read back in shuffled batches.

Dictionary learning and probing read far more activations than fit in memory, so
:func:`write_activations` runs the model over a corpus one token-budgeted batch at a time,
keeps only the real tokens (padding never reaches disk) and writes a shard whenever
``shard_tokens`` tokens are buffered. Memory is one batch plus one shard, whatever the corpus
size. :class:`ActivationStore` reads the folder shard by shard.

Format (a folder; everything plain so other tools read it without interp):

- ``shard_00000.safetensors`` ... : one safetensors file per shard, exactly ``shard_tokens``
  rows (the last shard fewer). Tensors: one per hook, named as the hook
  (``blocks.0.hook_resid_post``), shape ``[n_tokens, *hook dims after batch and pos]``
  (``[n, d_model]``, ``[n, head, d_head]``), in the store's dtype; ``doc`` and ``pos``
  (int64 ``[n_tokens]``): the document's index in the corpus (0-based, blank documents
  counted) and the token's position in that document's token ids (BOS included); ``token``
  (int64 ``[n_tokens]``): the token id.
- ``index.json``: ``{"format": "interp-activations", "version": 1, "hooks": {name: shape},
  "dtype", "shard_tokens", "seq_len", "source": {...what was run}, "shards": [{"file",
  "n_tokens"}], "n_tokens", "complete"}``. It is rewritten (atomically) after every shard,
  so an interrupted run resumes from the shards it lists: batches already written are
  skipped without running the model, and the resumed folder is byte-identical to an
  uninterrupted one (shards are cut at fixed token counts; nothing time-dependent is stored).

Tokens come from :func:`interp.tokenize.encode` and :func:`interp.tokenize.pad_batch`: each
document is cut into consecutive pieces of ``seq_len`` tokens, pieces are packed into batches
of at most ``batch_tokens`` padded tokens, in corpus order.

>>> # write_activations(model, texts, ["blocks.0.hook_resid_post"], "acts/")
>>> # for batch in ActivationStore("acts/").batches(4096, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError
from interp.tokenize import TokenBatch, encode, pad_batch, pad_id

__all__ = ["ActivationStore", "write_activations"]

FORMAT = "interp-activations"
INDEX = "index.json"
_TOKEN_MAJOR = ("hook_attn_scores", "hook_pattern")  # [batch, head, q, k]: not per token
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


@dataclass
class _Batch:
    """One padded batch and, per row, its document index and first position."""

    tokens: TokenBatch
    docs: list[int]
    starts: list[int]


def _batches(model: Any, texts: Iterable[str], seq_len: int,
             batch_tokens: int) -> Iterator[_Batch]:
    """Pieces of ``seq_len`` tokens per document, packed in order under a padded-token budget
    (``rows * longest row <= batch_tokens``; a single piece always fits)."""
    rows: list[list[int]] = []
    docs: list[int] = []
    starts: list[int] = []
    side_pad = pad_id(model)
    for d, text in enumerate(texts):
        if not text.strip():
            continue
        ids = encode(model, text)
        for s in range(0, len(ids), seq_len):
            piece = ids[s:s + seq_len]
            width = max([len(piece), *(len(r) for r in rows)])
            if rows and width * (len(rows) + 1) > batch_tokens:
                yield _Batch(pad_batch(rows, pad_id=side_pad), docs, starts)
                rows, docs, starts = [], [], []
            rows.append(piece)
            docs.append(d)
            starts.append(s)
    if rows:
        yield _Batch(pad_batch(rows, pad_id=side_pad), docs, starts)


def _check_hooks(model: Any, hooks: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(hooks))
    if not names:
        raise InterpError("Name at least one hook to store (e.g. blocks.0.hook_resid_post).")
    known = getattr(model, "hook_dict", {})
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=3)
            raise InterpError(f"Unknown hook {name!r}; closest: {', '.join(close) or 'none'}.")
        if re.search(r"\.experts\.\d+\.", name):
            raise InterpError(f"{name} holds only the tokens routed to that expert; store "
                              "the layer's mlp.hook_post or hook_mlp_out instead.")
        if name.endswith(_TOKEN_MAJOR):
            raise InterpError(f"{name} is [batch, head, q, k], not one row per token; store "
                              "hook_z, hook_q/k/v or the residual hooks instead.")
    return names


def _stop_layer(model: Any, hooks: Sequence[str]) -> int | None:
    """Run only the blocks the hooks need (every hook inside ``blocks.{l}``)."""
    layers = [re.match(r"blocks\.(\d+)\.", h) for h in hooks]
    if not all(layers) or not hasattr(model, "blocks"):
        return None
    return max(int(m.group(1)) for m in layers if m) + 1


class _Writer:
    """Buffers real-token rows and writes fixed-size shards plus the index."""

    def __init__(self, out: Path, meta: dict[str, Any], max_shards: int | None):
        self.out, self.meta, self.max_shards = out, meta, max_shards
        self.buf: dict[str, list[torch.Tensor]] = {}
        self.n_buf = 0
        self.new_shards = 0

    @property
    def full(self) -> bool:
        return self.max_shards is not None and self.new_shards >= self.max_shards

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        for k, v in rows.items():
            self.buf.setdefault(k, []).append(v)
        self.n_buf += int(rows["doc"].shape[0])
        size = self.meta["shard_tokens"]
        while self.n_buf >= size and not self.full:
            self._flush(size)

    def _flush(self, n: int) -> None:
        from safetensors.torch import save_file

        joined = {k: torch.cat(v) for k, v in self.buf.items()}
        shard = {k: v[:n].contiguous() for k, v in joined.items()}
        self.buf = {k: [v[n:]] for k, v in joined.items()}
        self.n_buf -= n
        name = _shard_name(len(self.meta["shards"]))
        tmp = self.out / (name + ".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, self.out / name)
        self.meta["shards"].append({"file": name, "n_tokens": n})
        self.meta["n_tokens"] += n
        self.new_shards += 1
        self.write_index()

    def finish(self) -> None:
        if self.n_buf and not self.full:
            self._flush(self.n_buf)
        if not self.full:
            self.meta["complete"] = True
        self.write_index()

    def write_index(self) -> None:
        tmp = self.out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.out / INDEX)


def _resume_meta(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The index to continue from: the folder's own when it was written by the same run,
    a fresh one for an empty or missing folder; anything else is an error."""
    index = out / INDEX
    if not index.exists():
        if out.exists() and any(p.suffix == ".safetensors" for p in out.iterdir()):
            raise InterpError(f"{out} holds shards but no {INDEX}; pass an empty --out folder.")
        return {**meta, "shards": [], "n_tokens": 0, "complete": False}
    old = json.loads(index.read_text())
    same = {k: old.get(k) for k in meta} == json.loads(json.dumps(meta))
    if not same:
        raise InterpError(f"{out} holds activations of a different run (model, hooks, corpus "
                          "or settings differ); pass another --out folder or empty this one.")
    for s in old["shards"]:
        if not (out / s["file"]).exists():
            raise InterpError(f"{out / s['file']} is listed in {INDEX} but missing; "
                              "empty the folder and run again.")
    return old


# Long because it is the whole streaming loop: resume skip, capture hooks, the real-token
# filter and shard flushing, each a few lines that read best in order.
def write_activations(model: Any, texts: Iterable[str], hooks: Sequence[str], out: str | Path,
                      *, seq_len: int | None = None, batch_tokens: int = 4096,
                      shard_tokens: int = 65536, dtype: str = "float32",
                      source: dict[str, Any] | None = None,
                      max_shards: int | None = None) -> dict[str, Any]:
    """Run ``model`` over ``texts`` and stream the ``hooks``' activations of real tokens to
    shards in ``out`` (see the module docstring for the format); returns the index.

    ``seq_len`` defaults to 128 tokens or the model's context if shorter. Resumes a folder
    an interrupted run left (same ``source``, hooks and settings).
    ``max_shards`` stops after writing that many new shards (the index says
    ``complete: false``; run again to continue). ``source`` is stored in the index to tell
    runs apart (the CLI puts the model name and the corpus file's size and hash there).
    """
    seq_len = min(128, model.cfg.n_ctx) if seq_len is None else seq_len
    if dtype not in _DTYPES:
        raise InterpError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    for name, v in (("seq_len", seq_len), ("batch_tokens", batch_tokens),
                    ("shard_tokens", shard_tokens)):
        if not isinstance(v, int) or v < 1:
            raise InterpError(f"{name} must be a positive integer, got {v!r}.")
    if seq_len > model.cfg.n_ctx:
        raise InterpError(f"seq_len {seq_len} exceeds the model's context n_ctx="
                          f"{model.cfg.n_ctx}; pass a smaller seq_len.")
    names = _check_hooks(model, hooks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "hooks": names, "dtype": dtype,
            "seq_len": seq_len, "batch_tokens": batch_tokens, "shard_tokens": shard_tokens,
            "source": source or {}}
    meta = _resume_meta(out, meta)
    if meta["complete"]:
        return meta
    writer = _Writer(out, meta, max_shards)
    skip = meta["n_tokens"]  # tokens already on disk: their batches are not run again
    stop = _stop_layer(model, names)
    store_dtype = _DTYPES[dtype]
    captured: dict[str, torch.Tensor] = {}
    keep: torch.Tensor | None = None

    def capture(t: torch.Tensor, hook: Any) -> None:
        captured[hook.name] = t.detach()[keep.to(t.device)].to("cpu", store_dtype)

    fwd = [(n, capture) for n in names]
    for batch in _batches(model, texts, seq_len, batch_tokens):
        if writer.full:
            break
        n_real = batch.tokens.n_tokens
        if skip >= n_real:
            skip -= n_real
            continue
        mask = batch.tokens.attention_mask
        keep = mask
        with torch.no_grad():
            model.run_with_hooks(batch.tokens.tokens.to(model.device),
                                 attention_mask=mask.long().to(model.device),
                                 return_type=None, stop_at_layer=stop, fwd_hooks=fwd)
        pos = torch.arange(mask.shape[1]).expand_as(mask) + torch.tensor(batch.starts)[:, None]
        rows = {n: captured.pop(n) for n in names}
        rows["doc"] = torch.tensor(batch.docs)[:, None].expand_as(mask)[mask]
        rows["pos"] = pos[mask]
        rows["token"] = batch.tokens.tokens[mask]
        if skip:
            rows = {k: v[skip:] for k, v in rows.items()}
            skip = 0
        meta.setdefault("shapes", {n: list(rows[n].shape[1:]) for n in names})
        writer.add(rows)
    writer.finish()
    return meta


class ActivationStore:
    """A folder written by :func:`write_activations` (or ``interp activations``).

    ``store.hooks``, ``store.n_tokens``, ``store.shards`` (file names), ``store.shard(i)``
    (one shard's tensors), ``store.batches(batch_size, shuffle=..., seed=...)``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if not index.exists():
            raise InterpError(f"{self.path} has no {INDEX}; write it with `interp activations`.")
        self.index = json.loads(index.read_text())
        if self.index.get("format") != FORMAT:
            raise InterpError(f"{index} is not an interp activation index.")
        self.hooks: list[str] = list(self.index["hooks"])
        self.n_tokens: int = int(self.index["n_tokens"])
        self.shards: list[str] = [s["file"] for s in self.index["shards"]]
        self.complete: bool = bool(self.index["complete"])

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, hooks={self.hooks}, "
                f"n_tokens={self.n_tokens}, shards={len(self.shards)})")

    def shard(self, i: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Shard ``i``: ``{hook: [n, ...], "doc", "pos", "token": [n]}``; ``keys`` reads only
        those tensors (``["doc", "pos", "token"]`` skips the activations, the bulk of a shard)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not 0 <= i < len(self.shards):
            raise InterpError(f"Shard {i} out of range; the store has {len(self.shards)}.")
        if keys is None:
            return load_file(str(self.path / self.shards[i]))
        with safe_open(str(self.path / self.shards[i]), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                hooks: Sequence[str] | None = None, buffer_shards: int = 2,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` token rows, ``{hook: [b, ...], "doc", "pos", "token"}``.

        ``shuffle``: shards are visited in a seeded random order and rows are shuffled within
        a window of ``buffer_shards`` shards (memory: that many shards), the usual compromise
        for training on more activations than fit in memory. Same ``seed``, same order.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InterpError(f"batch_size must be a positive integer, got {batch_size!r}.")
        keys = list(hooks) if hooks is not None else self.hooks
        for k in keys:
            if k not in self.hooks:
                raise InterpError(f"{k!r} is not in this store; it has {', '.join(self.hooks)}.")
        gen = torch.Generator().manual_seed(seed)
        order = (torch.randperm(len(self.shards), generator=gen).tolist() if shuffle
                 else list(range(len(self.shards))))
        fields = [*keys, "doc", "pos", "token"]
        carry: dict[str, torch.Tensor] | None = None
        for g in range(0, len(order), max(1, buffer_shards)):
            parts = [self.shard(i) for i in order[g:g + max(1, buffer_shards)]]
            if carry is not None:
                parts.insert(0, carry)
            pool = {k: torch.cat([p[k] for p in parts]) for k in fields}
            if shuffle:
                perm = torch.randperm(pool["doc"].shape[0], generator=gen)
                pool = {k: v[perm] for k, v in pool.items()}
            n = pool["doc"].shape[0]
            full = n - n % batch_size
            for s in range(0, full, batch_size):
                yield {k: v[s:s + batch_size] for k, v in pool.items()}
            carry = {k: v[full:] for k, v in pool.items()} if full < n else None
        if carry is not None and not drop_last:
            yield carry
