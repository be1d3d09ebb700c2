"""Statistics of count tables, and what chance gives for them.

Information theory on expert x domain / expert x token count tables (numpy, vectorised over a
leading sample axis), the permutation test that compares each with tables whose margins are the
observed ones (Patefield 1981: shuffling one variable's labels gives exactly such a random
table, so no per-token pairs are stored), and the two chance levels that are not permutation
nulls: top-k overlap of independently routed tokens (a reservoir sample) and router margins of
i.i.d. Gaussian logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LN2"]

LN2 = math.log(2.0)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along ``axis`` (zeros contribute nothing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis)



def _mi(tables: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) of count tables [..., rows, cols]."""
    t = tables.astype(np.float64)
    n = t.sum((-2, -1), keepdims=True)
    p = t / np.maximum(n, 1)
    pr, pc = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / (pr * pc)), 0.0)
    return terms.sum((-2, -1))


def _margin_entropies(table: np.ndarray) -> tuple[float, float]:
    n = max(float(table.sum()), 1.0)
    return float(_entropy(table.sum(1) / n)), float(_entropy(table.sum(0) / n))


def _kl_rows(tables: np.ndarray) -> np.ndarray:
    """Per row r: KL(P(col | row r) || P(col)) in bits, for tables [..., rows, cols]."""
    t = tables.astype(np.float64)
    rows = t.sum(-1, keepdims=True)
    cond = t / np.maximum(rows, 1)
    marg = t.sum(-2, keepdims=True) / np.maximum(t.sum((-2, -1), keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(cond > 0, cond * np.log(cond / marg), 0.0)
    return terms.sum(-1) / LN2


def _top_share(tables: np.ndarray, min_count: int) -> np.ndarray:
    """Occurrence-weighted mean over columns (tokens) with at least ``min_count`` occurrences of
    the share of that column's count in its largest row (its most common expert)."""
    t = tables.astype(np.float64)
    n_col = t.sum(-2)
    keep = n_col >= min_count
    top = t.max(-2)
    num = np.where(keep, top, 0.0).sum(-1)
    den = np.where(keep, n_col, 0.0).sum(-1)
    return num / np.maximum(den, 1)


def _random_tables(table: np.ndarray, n: int, rng: np.random.Generator,
                   chunk: int | None = None) -> Iterator[np.ndarray]:
    """Random contingency tables with the margins of ``table``: the exact distribution of the
    table after shuffling one variable's labels over the observations (Patefield 1981).
    Drawn in chunks of at most ~1M cells, so a vocabulary-sized table stays cheap in memory."""
    from scipy.stats import random_table

    if chunk is None:
        chunk = int(max(1, min(32, (1 << 20) // max(table.size, 1))))

    rows, cols = table.sum(1), table.sum(0)
    rk, ck = rows > 0, cols > 0
    dist = random_table(rows[rk], cols[ck], seed=rng)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        sub = dist.rvs(size=m, random_state=rng)
        full = np.zeros((m, *table.shape), dtype=np.int64)
        full[np.ix_(np.arange(m), np.flatnonzero(rk), np.flatnonzero(ck))] = sub
        done += m
        yield full


@dataclass
class _PermTest:
    """Observed statistics of a count table and their permutation nulls."""

    mi: float
    nmi: float
    nmi_null_mean: float
    nmi_null_p95: float
    p_value: float
    ami: float
    row_kl: np.ndarray | None = None  # observed per-row KL (bits)
    row_kl_null: np.ndarray | None = None  # mean null per-row KL
    row_p: np.ndarray | None = None
    top_share: float | None = None
    top_share_null: float | None = None


def _perm_test(table: np.ndarray, n_perm: int, rng: np.random.Generator, *, rows: bool = False,
               top_share_min: int | None = None) -> _PermTest:
    """MI / NMI of ``table`` against tables with the same margins (shuffled labels)."""
    table = np.asarray(table, dtype=np.int64)
    h_r, h_c = _margin_entropies(table)
    h_min = min(h_r, h_c)
    mi = float(_mi(table))
    nmi = mi / h_min if h_min > 0 else float("nan")
    null_mi: list[np.ndarray] = []
    kl_obs = _kl_rows(table) if rows else None
    kl_ge = np.zeros(table.shape[0]) if rows else None
    kl_sum = np.zeros(table.shape[0]) if rows else None
    ts_obs = float(_top_share(table, top_share_min)) if top_share_min is not None else None
    ts_null: list[np.ndarray] = []
    if n_perm > 0 and h_min > 0:
        for sample in _random_tables(table, n_perm, rng):
            null_mi.append(_mi(sample))
            if rows:
                kl = _kl_rows(sample)
                kl_sum += kl.sum(0)
                kl_ge += (kl >= kl_obs[None] - 1e-12).sum(0)
            if top_share_min is not None:
                ts_null.append(_top_share(sample, top_share_min))
    if null_mi:
        null = np.concatenate(null_mi)
        null_nmi = null / h_min
        p = float((1 + np.sum(null >= mi - 1e-12)) / (1 + len(null)))
        e_mi = float(null.mean())
        ami = (mi - e_mi) / (h_min - e_mi) if h_min - e_mi > 1e-12 else float("nan")
        res = _PermTest(mi, nmi, float(null_nmi.mean()), float(np.quantile(null_nmi, 0.95)), p,
                        ami)
    else:
        res = _PermTest(mi, nmi, float("nan"), float("nan"), float("nan"), float("nan"))
    if rows:
        res.row_kl = kl_obs
        if null_mi:
            res.row_kl_null = kl_sum / len(np.concatenate(null_mi))
            res.row_p = (1 + kl_ge) / (1 + len(np.concatenate(null_mi)))
    if top_share_min is not None:
        res.top_share = ts_obs
        res.top_share_null = float(np.concatenate(ts_null).mean()) if ts_null else float("nan")
    return res



def _reservoir_overlap(sets: torch.Tensor, E: int) -> float:
    """Share of distinct pairs in the reservoir whose top-k sets intersect: the consecutive
    overlap rate expected if neighbouring tokens were routed independently."""
    R = len(sets)
    if R < 2:
        return float("nan")
    mh = F.one_hot(sets, E).sum(1).clamp(max=1).float()  # [R, E]
    inter = (mh @ mh.T) > 0
    return float((inter.sum() - R) / (R * (R - 1)))


def _gaussian_router_baseline(E: int, k: int, tie_w: float, tie_l: float,
                              rng: np.random.Generator, n: int = 20000,
                              renormalized: bool = True) -> Callable[[float], dict[str, float]]:
    """Margins of a router whose logits are i.i.d. N(0, sigma^2) (softmax, top-k, renormalised
    or not as the model): what the margin statistics look like when the router has no
    preference structure, at the logit spread the real router has."""
    z = rng.standard_normal((n, E))

    def at(sigma: float) -> dict[str, float]:
        lg = np.sort(z * sigma, -1)[:, ::-1]
        out: dict[str, float] = {}
        if k >= 2:
            ex = np.exp(lg - lg[:, :1])
            w = ex[:, :k] / (ex[:, :k] if renormalized else ex).sum(-1, keepdims=True)
            m = w[:, 0] - w[:, 1]
            out.update({"margin_top12": float(m.mean()),
                        "near_tie_top12": float((m < tie_w).mean())})
        else:
            out.update({"margin_top12": float("nan"), "near_tie_top12": float("nan")})
        if k < E:
            g = lg[:, k - 1] - lg[:, k]
            out.update({"logit_gap_topk": float(g.mean()),
                        "near_tie_topk": float((g < tie_l).mean())})
        else:
            out.update({"logit_gap_topk": float("nan"), "near_tie_topk": float("nan")})
        return out

    return at
