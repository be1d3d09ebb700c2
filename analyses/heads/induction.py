"""Induction, duplicate-token and copying scores.

Olsson et al. 2022, *In-context Learning and Induction Heads* (Transformer Circuits Thread): on
sequences ``x1..xn x1..xn`` of distinct random tokens (:func:`analyses.heads.batches.
random_batches`), ``induction`` (prefix matching) is the mean attention from a second-copy
token to the token after its first occurrence, ``duplicate`` the mean attention to the first
occurrence itself; ``rand_prev_token`` and ``rand_first`` are the previous-token and
first-token attention on the same sequences. ``copying`` is the OV circuit's eigenvalue score
sum(l)/sum(|l|) of W_E W_V W_O W_U (Elhage et al. 2021, *A Mathematical Framework for
Transformer Circuits*), computed from weights alone.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analyses import distributed
from analyses.heads.batches import TokenBatch, VocabInfo, random_batches
from analyses.heads.scan import Accumulator, check_model, scan
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress

__all__ = ["RepeatStats", "copying_scores", "induction_scores"]


class RepeatStats(Accumulator):
    """Induction / duplicate-token / previous-token / first-token attention on repeated random
    tokens."""

    SUMS = ("ind", "dup", "prev", "first", "n_second", "n_rest", "n_seqs")

    def __init__(self, model: HookedTransformer):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.n = 0  # tokens per copy, set by the batches (the same in every batch)
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
            raise InterpError("RepeatStats needs repeated-random-token batches (see "
                              "random_batches).")
        start, n = batch.repeat
        B, T = batch.tokens.shape
        self.q2 = torch.arange(start + n, start + 2 * n)
        self.T = T
        self.n = n
        self.n_second += B * n
        self.n_rest += B * (T - 1)
        self.n_seqs += B

    def reduce(self) -> None:
        """Sum over the ranks; the copy length is the same everywhere (a rank without a batch
        takes it from the others)."""
        super().reduce()
        self.n = distributed.all_max(self.n)

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

        def d(t: torch.Tensor, n: float) -> np.ndarray:
            return (t / max(n, 1.0)).cpu().numpy().reshape(-1)

        return pd.DataFrame({
            "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
            "induction": d(self.ind, self.n_second), "duplicate": d(self.dup, self.n_second),
            "rand_prev_token": d(self.prev, self.n_rest), "rand_first": d(self.first, self.n_rest),
        })


def induction_scores(model: HookedTransformer, *, n_seqs: int = 64, half_len: int | None = None,
                     batch_size: int = 16, seed: int = 0, vocab: VocabInfo | None = None,
                     progress: Progress | None = None) -> pd.DataFrame:
    """Per-head prefix matching, duplicate-token, previous- and first-token attention on
    repeated random tokens (Olsson et al. 2022), see :func:`random_batches`."""
    check_model(model)
    acc = RepeatStats(model)
    batches = random_batches(model, n_seqs=n_seqs, half_len=half_len, batch_size=batch_size,
                             seed=seed, vocab=vocab)
    scan(model, batches, [acc], progress=progress, desc="repeated random tokens",
         total=math.ceil(n_seqs / batch_size))
    return acc.frame()


def copying_scores(model: HookedTransformer) -> pd.DataFrame:
    """OV copying score per head: sum(eig) / sum(|eig|) of the full OV circuit W_E W_V W_O W_U.

    Elhage et al. 2021 / Olsson et al. 2022 read the eigenvalues of the token -> logit OV
    circuit: positive real eigenvalues mean the head raises the logit of the token it attends
    to (copying). The [vocab, vocab] product has the same non-zero spectrum as the cyclic
    [d_head, d_head] product W_O g_f W_U W_E g_1 W_V (g: the gains of ln1 and ln_final, folded
    in; normalisation's centring and scale are ignored, as in the paper's attention-only
    models), which is what is computed. NaN when the model has no unembedding (e.g. MiniLM) or
    a nonlinear MLM head between the residual and the vocabulary.
    """
    check_model(model)
    cfg = model.cfg
    L, H = int(cfg.n_layers), int(cfg.n_heads)
    out = np.full((L, H), np.nan)
    if cfg.has_unembed and hasattr(model, "unembed") and not hasattr(model, "mlm_head"):
        with torch.no_grad():
            _fill_copying(model, out)
    return pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                         "copying": out.reshape(-1)})


def _gain(norm: object, d_model: int, device: torch.device) -> torch.Tensor:
    """A norm's gain vector, or ones where it has none."""
    if norm is not None and hasattr(norm, "w"):
        return norm.w.detach().float()
    return torch.ones(d_model, device=device)


def _fill_copying(model: HookedTransformer, out: np.ndarray) -> None:
    """Write each head's copying score into ``out`` [layer, head]."""
    cfg = model.cfg
    H = int(cfg.n_heads)
    W_E = model.W_E.detach().float()
    W_U = model.W_U.detach().float()
    gf = _gain(getattr(model, "ln_final", None), cfg.d_model, W_E.device)
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
