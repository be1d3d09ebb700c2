"""SAEs trained and measured from an on-disk activation store, one shard at a time.

``interp activations`` (:mod:`interp.activation_store`) writes hook activations of a corpus to
safetensors shards, each row one real token with its document index ``doc``, position ``pos``
and token id. :class:`StoreSplit` is the view an SAE needs of such a folder: the rows of one
hook (a transcoder: two hooks, row-aligned), of one split of the documents, without each
sequence's first position, in fixed-size shuffled batches. Memory is the store's reading window
(two shards) plus one batch, whatever the store's size, so a 10x larger store costs 10x time
and the same memory (``BENCHMARKS.md``).

- Split: every ``holdout_every``-th document (``doc % holdout_every == holdout_every - 1``) is
  held out for evaluation; by document, not by row, so no evaluation token's context was seen
  in training.
- First positions: ``pos % seq_len == 0`` starts a sequence the model read (the store cuts
  documents into ``seq_len`` pieces), whose residual is an outsized attention sink (Xiao et
  al. 2023); :func:`~analyses.dictionary.train.collect_activations` leaves it out for the same
  reason.
- :meth:`StoreSplit.pieces` rebuilds the token sequences the model read from the stored ids,
  so the CE loss recovered needs no corpus file, and :func:`store_top_examples` reads each
  feature's strongest activations straight from the stored rows, without running the model.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch

from analyses.dictionary.sae import SAE
from interp.activation_store import ActivationStore
from interp.errors import InterpError

__all__ = ["StoreSplit", "store_top_examples"]

Split = Literal["train", "eval", "all"]
_IDS = ["doc", "pos", "token"]


@dataclass
class StoreSplit:
    """One split of an :class:`~interp.activation_store.ActivationStore` at ``hook_name``
    (and, for a transcoder, its targets at ``hook_name_out``); see the module docstring."""

    store: ActivationStore
    hook_name: str
    hook_name_out: str | None = None
    split: Split = "all"
    holdout_every: int = 5
    drop_first: bool = True
    _moments: tuple[torch.Tensor, float, int] | None = field(default=None, init=False,
                                                               repr=False)

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval", "all"):
            raise InterpError(f"split must be train, eval or all, got {self.split!r}.")
        if not isinstance(self.holdout_every, int) or self.holdout_every < 2:
            raise InterpError(f"holdout_every must be an integer >= 2, got {self.holdout_every!r}.")
        for name in self.hook_names:
            if name not in self.store.hooks:
                raise InterpError(
                    f"{self.store.path} holds {', '.join(self.store.hooks)}, not {name}; pass one "
                    f"of those or store it with `interp activations MODEL --hooks {name} ...`.")
        self.seq_len = int(self.store.index["seq_len"])

    @property
    def hook_names(self) -> list[str]:
        """The stored tensors read: the input hook, then the output hook if another."""
        out = self.hook_name_out
        return [self.hook_name] + ([out] if out and out != self.hook_name else [])

    def width(self, hook: str) -> int:
        """The last dimension of ``hook``'s rows (d_model for a residual hook)."""
        shapes = self.store.index.get("shapes", {})
        if hook in shapes:
            return int(shapes[hook][-1])
        if not self.store.shards:
            raise InterpError(f"{self.store.path} holds no shards; write activations into it.")
        return int(self.store.shard(0, [hook])[hook].shape[-1])

    def _keep(self, doc: torch.Tensor, pos: torch.Tensor, *, first: bool) -> torch.Tensor:
        """Which rows belong to this split (and, unless ``first``, are no sequence's first)."""
        keep = torch.ones_like(doc, dtype=torch.bool)
        held = doc % self.holdout_every == self.holdout_every - 1
        if self.split == "train":
            keep &= ~held
        elif self.split == "eval":
            keep &= held
        if self.drop_first and not first:
            keep &= pos % self.seq_len != 0
        return keep

    def _rows(self, chunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = self._keep(chunk["doc"], chunk["pos"], first=False)
        x = chunk[self.hook_name][keep].float()
        y = chunk[self.hook_names[-1]][keep].float()
        return {"x": x.flatten(1), "y": y.flatten(1),
                "doc": chunk["doc"][keep], "pos": chunk["pos"][keep]}

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                cycle: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{"x", "y", "doc", "pos"}`` of exactly ``batch_size`` rows (the last one of
        a single pass may be smaller). ``y`` is ``x`` for an SAE, the targets for a
        transcoder. ``shuffle`` reads shards in a seeded order and shuffles rows within the
        store's two-shard window; ``cycle`` repeats passes forever, pass ``e`` seeded
        ``seed + e`` (training draws as many batches as it has steps)."""
        self.require_rows()
        pending: list[dict[str, torch.Tensor]] = []
        n_pending, epoch = 0, 0
        while True:
            for chunk in self.store.batches(batch_size, shuffle=shuffle, seed=seed + epoch,
                                            hooks=self.hook_names):
                rows = self._rows(chunk)
                pending.append(rows)
                n_pending += rows["x"].shape[0]
                while n_pending >= batch_size:
                    pool = {k: torch.cat([p[k] for p in pending]) for k in rows}
                    yield {k: v[:batch_size] for k, v in pool.items()}
                    pending = [{k: v[batch_size:] for k, v in pool.items()}]
                    n_pending -= batch_size
            epoch += 1
            if not cycle:
                break
        if n_pending:
            yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}

    def moments(self) -> tuple[torch.Tensor, float, int]:
        """(mean of ``y``, mean squared norm of ``y``, rows) in one unshuffled pass, in float64
        running sums: the training's decoder-bias start and loss scale."""
        if self._moments is None:
            total: torch.Tensor | None = None
            sq, n = 0.0, 0
            for i in range(len(self.store.shards)):
                rows = self._rows(self.store.shard(i, [*self.hook_names, "doc", "pos"]))
                y = rows["y"].double()
                total = y.sum(0) if total is None else total + y.sum(0)
                sq += float(y.pow(2).sum())
                n += y.shape[0]
            if n == 0 or total is None:
                self._moments = (torch.zeros(0), 0.0, 0)
            else:
                self._moments = ((total / n).float(), sq / n, n)
        return self._moments

    @property
    def n_rows(self) -> int:
        """Rows in this split (after leaving out first positions)."""
        return self.moments()[2]

    def require_rows(self) -> None:
        """Raise a one-line error if this split is empty (a store of too few documents)."""
        if self.n_rows == 0:
            raise InterpError(
                f"The {self.split} split of {self.store.path} has no rows (every "
                f"{self.holdout_every}th of its documents is held out for evaluation); store "
                "activations of more documents.")

    def pieces(self, max_tokens: int) -> list[list[int]]:
        """Token ids of the sequences the model read for this split's documents, in corpus
        order, until ``max_tokens`` tokens (the last piece may be cut: a prefix of a sequence is
        still what a causal model reads)."""
        ids: dict[tuple[int, int], list[tuple[int, int]]] = {}
        n = 0
        for i in range(len(self.store.shards)):
            cols = self.store.shard(i, _IDS)
            keep = self._keep(cols["doc"], cols["pos"], first=True)
            for d, p, t in zip(*(cols[k][keep].tolist() for k in _IDS), strict=True):
                ids.setdefault((d, p // self.seq_len), []).append((p, t))
                n += 1
                if n >= max_tokens:
                    break
            if n >= max_tokens:
                break
        return [[t for _, t in sorted(rows)] for _, rows in sorted(ids.items())]

    def tokens_at(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """The token id at each ``(doc, pos)`` in ``keys``, reading only the id columns."""
        found: dict[tuple[int, int], int] = {}
        if not keys:
            return found
        wanted = torch.tensor(sorted(d * (1 << 32) + p for d, p in keys))
        for i in range(len(self.store.shards)):
            cols = self.store.shard(i, _IDS)
            hit = torch.isin(cols["doc"] * (1 << 32) + cols["pos"], wanted)
            for d, p, t in zip(*(cols[k][hit].tolist() for k in _IDS), strict=True):
                found[(d, p)] = t
        return found


def _token_text(model: Any, token: int) -> str:
    if model is None or getattr(model, "tokenizer", None) is None:
        return f"<{token}>"
    return str(model.to_string([token]))


@torch.no_grad()
def store_top_examples(data: StoreSplit, sae: SAE, *, features: list[int], k: int = 5,
                       window: int = 8, model: Any = None) -> pd.DataFrame:
    """The ``k`` strongest activations of each of ``features`` over ``data``'s rows, read from
    the stored activations (one bounded heap per feature), then their contexts from the stored
    token ids (up to ``window`` tokens before, within the sequence the model read). Columns as
    :func:`~analyses.dictionary.metrics.top_examples`: ``feature``, ``rank``, ``activation``,
    ``token``, ``context`` (the token in [brackets]); ``model`` only turns ids into text."""
    heaps: dict[int, list[tuple[float, int, int]]] = {f: [] for f in features}
    cols = torch.tensor(features, dtype=torch.long)
    for batch in data.batches(4096, shuffle=False):
        acts = sae.encode(batch["x"])[:, cols]  # [rows, n_features]
        vals, idx = acts.topk(min(k, acts.shape[0]), dim=0)
        for j, feat in enumerate(features):
            for v, r in zip(vals[:, j].tolist(), idx[:, j].tolist(), strict=True):
                if v <= 0:
                    break
                item = (v, int(batch["doc"][r]), int(batch["pos"][r]))
                push = heapq.heappush if len(heaps[feat]) < k else heapq.heappushpop
                push(heaps[feat], item)
    spans = {(d, q) for h in heaps.values() for _, d, p in h
             for q in range(max(p - window, p - p % data.seq_len), p + 1)}
    token = data.tokens_at(spans)
    rows = []
    for feat in features:
        for rank, (v, d, p) in enumerate(sorted(heaps[feat], reverse=True)):
            start = max(p - window, p - p % data.seq_len)
            strs = [_token_text(model, token[(d, q)]) for q in range(start, p + 1)]
            rows.append({"feature": feat, "rank": rank, "activation": v, "token": strs[-1],
                         "context": "".join(strs[:-1]) + f"[{strs[-1]}]"})
    return pd.DataFrame(rows, columns=["feature", "rank", "activation", "token", "context"])
