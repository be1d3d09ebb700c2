"""The streamed accumulator: one batch of router hooks in, fixed-size running counts kept.

:class:`RoutingAccumulator` reduces each batch of every MoE layer's ``hook_router_logits``,
``hook_expert_indices`` and ``hook_expert_weights`` into sums whose size is bounded by experts,
domains and the vocabulary, never by the corpus length; accumulators over shards of a corpus
merge into the one-pass counts. :meth:`RoutingAccumulator.result` hands the counts to
:func:`analyses.moe.result.to_result`, which turns them into DataFrames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from analyses.moe.result import to_result
from interp.errors import InterpError

if TYPE_CHECKING:
    from analyses.moe.result import MoEResult

__all__ = ["RoutingAccumulator"]


@dataclass
class _LayerAcc:
    """Fixed-size running sums of one MoE layer (size independent of the corpus length)."""

    E: int
    k: int
    n: int = 0
    first: torch.Tensor = field(default=None)  # [E] first-choice counts
    anyk: torch.Tensor = field(default=None)  # [E] top-k counts
    prob_sum: torch.Tensor = field(default=None)  # [E] sum of router probabilities
    ent_sum: float = 0.0  # sum of per-token router entropies (nats)
    var_sum: float = 0.0  # sum of per-token logit variances across experts
    dom_first: torch.Tensor = field(default=None)  # [E, D] first choice x domain
    dom_any: torch.Tensor = field(default=None)  # [E, D] top-k x domain
    tok_keys: torch.Tensor = field(default=None)  # sorted token * E + first expert
    tok_counts: torch.Tensor = field(default=None)
    pairs: int = 0
    same_top1: int = 0
    overlap_topk: int = 0
    margin12_sum: float = 0.0
    tie12: int = 0
    gap_sum: float = 0.0
    tie_gap: int = 0
    res_keys: torch.Tensor = field(default=None)  # reservoir: random keys [<=R]
    res_sets: torch.Tensor = field(default=None)  # reservoir: top-k index rows [<=R, k]

    def __post_init__(self) -> None:
        self.first = torch.zeros(self.E, dtype=torch.long)
        self.anyk = torch.zeros(self.E, dtype=torch.long)
        self.prob_sum = torch.zeros(self.E, dtype=torch.float64)
        self.dom_first = torch.zeros(self.E, 0, dtype=torch.long)
        self.dom_any = torch.zeros(self.E, 0, dtype=torch.long)
        self.tok_keys = torch.zeros(0, dtype=torch.long)
        self.tok_counts = torch.zeros(0, dtype=torch.long)
        self.res_keys = torch.zeros(0)
        self.res_sets = torch.zeros(0, self.k, dtype=torch.long)


_SUMMED = ("ent_sum", "var_sum", "pairs", "same_top1", "overlap_topk", "margin12_sum", "tie12",
           "gap_sum", "tie_gap")


class RoutingAccumulator:
    """Streams routing of every MoE layer into fixed-size counts; :meth:`result` turns them
    into DataFrames. Memory: O(layers x (E x domains + E^2 x layers + distinct (token, expert)
    pairs + reservoir)), bounded by the vocabulary, never by the corpus length.

    ``update`` takes one batch's hook tensors for one layer; :func:`routing_stats` drives it.
    """

    def __init__(self, layers: Sequence[int], n_experts: int, top_k: int, *,
                 reservoir: int = 2048, tie_weight: float = 0.05, tie_logit: float = 0.1,
                 renormalized: bool = True, seed: int = 0):
        self.layers = list(layers)
        self.E, self.k = int(n_experts), int(top_k)
        self.R = int(reservoir)
        self.tie_weight, self.tie_logit = float(tie_weight), float(tie_logit)
        # top-k weights sum to 1 (else: softmax probabilities)
        self.renormalized = bool(renormalized)
        self.acc = {layer: _LayerAcc(self.E, self.k) for layer in self.layers}
        self.cross = {(a, b): torch.zeros(self.E, self.E, dtype=torch.long)
                      for i, a in enumerate(self.layers) for b in self.layers[i + 1:]}
        self.gen = torch.Generator().manual_seed(seed)
        self.n_domains = 0
        self._top1: dict[int, torch.Tensor] = {}

    # -- one batch --------------------------------------------------------------------------
    def update(self, layer: int, logits: torch.Tensor, indices: torch.Tensor,
               weights: torch.Tensor, tokens: torch.Tensor, domains: torch.Tensor | None,
               valid: torch.Tensor) -> None:
        """Add one batch of one layer: logits [batch, pos, E], indices/weights [batch, pos, k],
        tokens [batch, pos], domains [batch, pos] (-1 = none) or None, valid [batch, pos]
        bool."""
        a, E, k = self.acc[layer], self.E, self.k
        logits = logits.detach().float().cpu()
        weights = weights.detach().float().cpu()
        indices = indices.detach().long().cpu()
        # first choice = the largest weight (robust to an unsorted top-k from a loader)
        order = weights.sort(dim=-1, descending=True, stable=True).indices
        indices, weights = indices.gather(-1, order), weights.gather(-1, order)
        v = valid.reshape(-1)
        lg = logits.reshape(-1, E)[v]
        ix = indices.reshape(-1, k)[v]
        w = weights.reshape(-1, k)[v]
        n = int(v.sum())
        if n == 0:
            return
        top1 = ix[:, 0]
        a.n += n
        a.first += torch.bincount(top1, minlength=E)
        a.anyk += torch.bincount(ix.reshape(-1), minlength=E)
        self._add_router(a, lg, w)
        if domains is not None:
            self._add_domains(a, domains.reshape(-1)[v].cpu(), top1, ix)
        self._add_tokens(a, tokens.reshape(-1)[v].cpu(), top1)
        self._add_pairs(a, indices, valid)
        if self.R:
            self._add_reservoir(a, ix, n)
        self._top1[layer] = top1

    def skip(self, valid: torch.Tensor) -> None:
        """Account for a batch another rank of a distributed run reads: draw the random
        reservoir keys :meth:`update` would have drawn for it (one ``rand`` per layer), so
        every rank's keys, and so the merged reservoir, are the one-process ones."""
        n = int(valid.sum())
        if n and self.R:
            for _ in self.layers:
                torch.rand(n, generator=self.gen)

    def _add_router(self, a: _LayerAcc, lg: torch.Tensor, w: torch.Tensor) -> None:
        """Router probabilities and entropy; margins: top-1 vs top-2 weight, and the logit gap
        at the top-k selection boundary."""
        E, k = self.E, self.k
        logp = torch.log_softmax(lg, -1)
        p = logp.exp()
        a.prob_sum += p.sum(0).double()
        a.ent_sum += float(-(p * logp).nan_to_num().sum())
        a.var_sum += float(lg.var(-1, unbiased=False).sum()) if E > 1 else 0.0
        if k >= 2:
            m12 = w[:, 0] - w[:, 1]
            a.margin12_sum += float(m12.sum())
            a.tie12 += int((m12 < self.tie_weight).sum())
        if k < E:
            srt = lg.sort(-1, descending=True).values
            gap = srt[:, k - 1] - srt[:, k]
            a.gap_sum += float(gap.sum())
            a.tie_gap += int((gap < self.tie_logit).sum())

    def _add_domains(self, a: _LayerAcc, d: torch.Tensor, top1: torch.Tensor,
                     ix: torch.Tensor) -> None:
        """Expert x domain counts of the labelled tokens (first choice and top-k)."""
        E, k = self.E, self.k
        lab = d >= 0
        if lab.any():
            dmax = int(d[lab].max()) + 1
            self._grow_domains(dmax)
            D = a.dom_first.shape[1]
            a.dom_first += torch.bincount(top1[lab] * D + d[lab], minlength=E * D).view(E, D)
            dk = d[lab][:, None].expand(-1, k).reshape(-1)
            a.dom_any += torch.bincount(ix[lab].reshape(-1) * D + dk, minlength=E * D).view(E, D)

    def _add_tokens(self, a: _LayerAcc, tok: torch.Tensor, top1: torch.Tensor) -> None:
        """Token id x first expert, sparse: sorted unique keys with counts."""
        keys, counts = torch.unique(tok * self.E + top1, return_counts=True)
        allk = torch.cat([a.tok_keys, keys])
        allc = torch.cat([a.tok_counts, counts])
        a.tok_keys, inv = torch.unique(allk, return_inverse=True)
        a.tok_counts = torch.zeros(len(a.tok_keys), dtype=torch.long).index_add_(0, inv, allc)

    def _add_pairs(self, a: _LayerAcc, indices: torch.Tensor, valid: torch.Tensor) -> None:
        """Consecutive tokens (t, t+1) inside each sequence: same first choice, top-k overlap."""
        B, T = valid.shape
        full_idx = indices.reshape(B, T, self.k)
        pair = valid[:, :-1] & valid[:, 1:]
        if T > 1 and pair.any():
            t1 = full_idx[..., 0]
            a.pairs += int(pair.sum())
            a.same_top1 += int(((t1[:, :-1] == t1[:, 1:]) & pair).sum())
            mh = F.one_hot(full_idx, self.E).sum(-2).bool()  # [batch, pos, E]
            a.overlap_topk += int(((mh[:, :-1] & mh[:, 1:]).any(-1) & pair).sum())

    def _add_reservoir(self, a: _LayerAcc, ix: torch.Tensor, n: int) -> None:
        """Reservoir of top-k sets: keep the R smallest uniform keys (a uniform sample,
        mergeable)."""
        keys_r = torch.rand(n, generator=self.gen)
        kk = torch.cat([a.res_keys, keys_r])
        ss = torch.cat([a.res_sets, ix])
        if len(kk) > self.R:
            keep = kk.topk(self.R, largest=False).indices
            kk, ss = kk[keep], ss[keep]
        a.res_keys, a.res_sets = kk, ss

    def end_batch(self) -> None:
        """Cross-layer joint counts of the layers updated since the last call (same tokens)."""
        E = self.E
        for (la, lb), joint in self.cross.items():
            if (la in self._top1 and lb in self._top1
                    and len(self._top1[la]) == len(self._top1[lb])):
                joint += torch.bincount(self._top1[la] * E + self._top1[lb],
                                        minlength=E * E).view(E, E)
        self._top1.clear()

    def _grow_domains(self, dmax: int) -> None:
        if dmax <= self.n_domains:
            return
        for a in self.acc.values():
            pad = dmax - a.dom_first.shape[1]
            a.dom_first = F.pad(a.dom_first, (0, pad))
            a.dom_any = F.pad(a.dom_any, (0, pad))
        self.n_domains = dmax

    # -- shards and size --------------------------------------------------------------------
    def merge(self, other: RoutingAccumulator) -> RoutingAccumulator:
        """Add another accumulator's counts (the same model, another shard of the corpus), as a
        data-parallel worker would after gathering: every count is a sum; the reservoirs merge
        by keeping the R smallest random keys, which is again a uniform sample of the union."""
        if (self.layers, self.E, self.k) != (other.layers, other.E, other.k):
            raise InterpError("Only accumulators of the same model (layers, experts, top-k) can "
                              "be merged.")
        self._grow_domains(other.n_domains)
        other._grow_domains(self.n_domains)
        for layer in self.layers:
            a, b = self.acc[layer], other.acc[layer]
            a.n += b.n
            for name in ("first", "anyk", "prob_sum", "dom_first", "dom_any"):
                setattr(a, name, getattr(a, name) + getattr(b, name))
            for name in _SUMMED:
                setattr(a, name, getattr(a, name) + getattr(b, name))
            a.tok_keys, inv = torch.unique(torch.cat([a.tok_keys, b.tok_keys]),
                                           return_inverse=True)
            a.tok_counts = torch.zeros(len(a.tok_keys), dtype=torch.long).index_add_(
                0, inv, torch.cat([a.tok_counts, b.tok_counts]))
            kk, ss = torch.cat([a.res_keys, b.res_keys]), torch.cat([a.res_sets, b.res_sets])
            if len(kk) > self.R:
                keep = kk.topk(self.R, largest=False).indices
                kk, ss = kk[keep], ss[keep]
            a.res_keys, a.res_sets = kk, ss
        for key in self.cross:
            self.cross[key] += other.cross[key]
        return self

    def nbytes(self) -> int:
        """Bytes held by the accumulators (what grows, if anything, with the corpus)."""
        total = sum(j.numel() * j.element_size() for j in self.cross.values())
        for a in self.acc.values():
            for t in (a.first, a.anyk, a.prob_sum, a.dom_first, a.dom_any, a.tok_keys,
                      a.tok_counts, a.res_keys, a.res_sets):
                total += t.numel() * t.element_size()
        return total

    # -- results ----------------------------------------------------------------------------
    def result(self, *, domain_names: Sequence[str] | None = None,
               token_names: Callable[[int], str] | None = None, n_perm: int = 200,
               min_token_count: int = 5, seed: int = 0) -> MoEResult:
        """Turn the counts into DataFrames (permutation baselines sampled here, seeded)."""
        return to_result(self, domain_names=domain_names, token_names=token_names,
                         n_perm=n_perm, min_token_count=min_token_count, seed=seed)
