"""Syntactic head scores: word-level dependency accuracy against a fixed-offset baseline.

Clark et al. 2019, *What Does BERT Look At? An Analysis of BERT's Attention*, sec. 4.2:
attention between words (rows averaged over the query word's pieces, columns summed over the
key word's pieces, special tokens and the word itself ignored); for each relation and
direction, accuracy = share of gold pairs whose most-attended word is the gold partner,
compared with the best fixed relative offset in -3..+3 (only backwards offsets in a causal
model). The labels (:mod:`analyses.heads.classify`) decide when a margin is large enough.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyses import distributed
from analyses.heads.batches import RelationIndex, TokenBatch, is_causal
from analyses.heads.scan import DIRECTIONS, OFFSETS, Accumulator
from interp import HookedTransformer
from interp.errors import InterpError

__all__ = ["SYNTAX_COLUMNS", "SyntaxStats"]

SYNTAX_COLUMNS = ["relation", "direction", "layer", "head", "accuracy", "baseline_accuracy",
                  "baseline_offset", "n", "margin"]


class SyntaxStats(Accumulator):
    """Clark et al. (2019) word-level dependency accuracy per (relation, direction, head)."""

    SUMS = ("hits", "n", "base", "n_pairs")

    def __init__(self, model: HookedTransformer, relations: RelationIndex):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.relations = relations
        self.device = model.W_E.device
        self.causal = is_causal(model)
        self.cap = 64
        f = dict(dtype=torch.float64, device=self.device)
        self.hits = torch.zeros(self.L, self.cap, self.H, **f)
        self.n = torch.zeros(self.cap, **f)
        self.base = torch.zeros(self.cap, len(OFFSETS), **f)
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

    def reduce(self) -> None:
        """Sum over the ranks after padding every rank's tables to the largest capacity (ranks
        that saw different batches may have grown them differently)."""
        cap = distributed.all_max(self.cap)
        if cap > self.cap:
            pad = cap - self.cap
            self.hits = torch.cat([self.hits, self.hits.new_zeros(self.L, pad, self.H)], 1)
            self.n = torch.cat([self.n, self.n.new_zeros(pad)])
            self.base = torch.cat([self.base, self.base.new_zeros(pad, len(OFFSETS))])
            self.cap = cap
        super().reduce()

    def begin(self, batch: TokenBatch) -> None:
        if batch.piece2word is None or batch.pairs is None:
            raise InterpError("SyntaxStats needs parsed batches (see sentence_batches).")
        p2w = batch.piece2word.to(self.device)
        has_words = batch.n_words is not None and len(batch.n_words)
        W = max(int(batch.n_words.max()) if has_words else 1, 1)
        M = torch.nn.functional.one_hot((p2w + 1).clamp(min=0), W + 1)[..., 1:].float()  # [B, T, W]
        M = M * (p2w >= 0)[..., None]
        counts = M.sum(1)  # [B, W] pieces per word
        self.M = M
        # [B, W, T]: mean over query pieces
        self.Mq = (M / counts.clamp(min=1)[:, None, :]).transpose(1, 2)
        ok = counts > 0
        eye = torch.eye(W, dtype=torch.bool, device=self.device)
        self.key_bad = ~ok[:, None, :] | eye[None]  # [B, q, k]
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
        if not groups:
            return pd.DataFrame(columns=SYNTAX_COLUMNS)
        L, H = self.L, self.H
        gi = np.repeat(np.array(groups), L * H)
        j = np.array(allowed)[base[groups][:, allowed].argmax(1)]  # best fixed offset per group
        jb = dict(zip(groups, j, strict=True))
        accuracy = hits[:, groups, :].transpose(1, 0, 2) / n[groups][:, None, None]
        df = pd.DataFrame({
            "relation": [self.relations.names[g // 2] for g in gi],
            "direction": [DIRECTIONS[g % 2] for g in gi],
            "layer": np.tile(np.repeat(np.arange(L), H), len(groups)),
            "head": np.tile(np.arange(H), L * len(groups)),
            "accuracy": accuracy.reshape(-1),
            "baseline_accuracy": np.array([base[g, jb[g]] / n[g] for g in gi]),
            "baseline_offset": np.array([OFFSETS[jb[g]] for g in gi]),
            "n": n[gi].astype(int),
        })
        df["margin"] = df["accuracy"] - df["baseline_accuracy"]
        return df
