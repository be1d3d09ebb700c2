"""Counts -> DataFrames: every routing number beside its chance level.

:func:`to_result` reads a :class:`~analyses.moe.accumulator.RoutingAccumulator`'s counts and
builds the frames of :class:`MoEResult` layer by layer: load, domains (with their permutation
test), tokens (likewise), consecutive tokens, router margins, then the cross-layer agreement.
The permutation baselines are drawn here from one seeded generator, always in that order, so a
seed gives the same frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analyses.moe.stats import (
    LN2,
    _entropy,
    _gaussian_router_baseline,
    _perm_test,
    _reservoir_overlap,
)
from interp.errors import InterpError

if TYPE_CHECKING:
    from analyses.moe.accumulator import RoutingAccumulator, _LayerAcc

__all__ = ["MoEResult", "to_result"]

_DOMAIN_COLS = ["layer", "expert", "domain", "tokens", "share", "share_top1", "lift", "uniform"]
_EXPERT_COLS = ["layer", "expert", "tokens_top1", "top_domain", "top_domain_share",
                "top_domain_lift", "spec_index_bits", "spec_index_baseline", "p_value"]
_CROSS_COLS = ["layer_a", "layer_b", "nmi", "nmi_baseline", "p_value", "same_expert_rate"]
_NAN = float("nan")


@dataclass
class MoEResult:
    """The frames of :func:`routing_stats` (columns documented in :func:`routing_stats`)."""

    load: pd.DataFrame
    domain: pd.DataFrame
    experts: pd.DataFrame
    tokens: pd.DataFrame
    summary: pd.DataFrame
    cross_layer: pd.DataFrame
    peak_accumulator_bytes: int = 0


def to_result(acc: RoutingAccumulator, *, domain_names: Sequence[str] | None = None,
              token_names: Callable[[int], str] | None = None, n_perm: int = 200,
              min_token_count: int = 5, seed: int = 0) -> MoEResult:
    """The frames of ``acc``'s counts (see :meth:`RoutingAccumulator.result`)."""
    rng = np.random.default_rng(seed)
    E, k = acc.E, acc.k
    names = list(domain_names or [])
    dname = [names[i] if i < len(names) else str(i) for i in range(acc.n_domains)]
    load_rows: list[dict] = []
    dom_rows: list[dict] = []
    exp_rows: list[dict] = []
    tok_rows: list[dict] = []
    sum_rows: list[dict] = []
    sims = _gaussian_router_baseline(E, k, acc.tie_weight, acc.tie_logit, rng,
                                     renormalized=acc.renormalized)
    for layer in acc.layers:
        a = acc.acc[layer]
        if a.n == 0:
            raise InterpError("No tokens were routed: the corpus is empty or fully padded; give "
                              "it some text.")
        row = _load(layer, a, load_rows)
        if acc.n_domains:
            row.update(_domains(layer, a, dname, n_perm, rng, dom_rows, exp_rows))
        row.update(_tokens(layer, a, n_perm, rng, min_token_count, token_names, tok_rows))
        row.update(_consecutive(a))
        row.update(_margins(a))
        # sigma of i.i.d. Gaussian logits with the same expected per-token spread
        sim = sims(math.sqrt(a.var_sum / a.n * E / (E - 1)) if E > 1 else 0.0)
        row.update({f"{key}_baseline": val for key, val in sim.items()})
        sum_rows.append(row)
    return MoEResult(
        load=pd.DataFrame(load_rows), domain=pd.DataFrame(dom_rows, columns=_DOMAIN_COLS),
        experts=pd.DataFrame(exp_rows, columns=_EXPERT_COLS), tokens=pd.DataFrame(tok_rows),
        summary=pd.DataFrame(sum_rows),
        cross_layer=pd.DataFrame(_cross_layer(acc, n_perm, rng), columns=_CROSS_COLS),
    )


def _load(layer: int, a: _LayerAcc, load_rows: list[dict]) -> dict[str, Any]:
    """Load rows per expert (appended), and the layer's summary row so far: load CV against
    uniformly random assignment, router and load entropies against log E."""
    E, k = a.E, a.k
    first = a.first.numpy().astype(np.float64)
    anyk = a.anyk.numpy().astype(np.float64)
    f1, fk = first / a.n, anyk / (a.n * k)
    pbar = (a.prob_sum / a.n).numpy()
    for e in range(E):
        load_rows.append({"layer": layer, "expert": e, "tokens_top1": int(first[e]),
                          "tokens_topk": int(anyk[e]), "share_top1": f1[e], "share_topk": fk[e],
                          "mean_router_prob": pbar[e], "uniform": 1.0 / E})
    std_std = math.sqrt((E - 1) / a.n) if a.n else float("nan")
    return {
        "layer": layer, "n_tokens": a.n, "n_experts": E, "top_k": k,
        "cv_top1": float(first.std() / first.mean()), "cv_topk": float(anyk.std() / anyk.mean()),
        "cv_random": std_std, "max_over_mean_topk": float(anyk.max() / anyk.mean()),
        "router_entropy": a.ent_sum / a.n / math.log(E),
        "load_entropy": float(_entropy(fk) / math.log(E)),
        "router_prob_entropy": float(_entropy(pbar) / math.log(E)),
        "entropy_uniform": 1.0,
    }


def _domains(layer: int, a: _LayerAcc, dname: list[str], n_perm: int, rng: np.random.Generator,
             dom_rows: list[dict], exp_rows: list[dict]) -> dict[str, Any]:
    """Expert x domain rows and per-expert specialisation rows (appended), and the layer's
    NMI(expert; domain) against its permutation null."""
    E, k, D = a.E, a.k, len(dname)
    tf, ta = a.dom_first.numpy(), a.dom_any.numpy()
    n_d = tf.sum(0)
    pt = _perm_test(tf, n_perm, rng, rows=True)
    summary = {"n_domains": int((n_d > 0).sum()), "mi_domain_bits": pt.mi / LN2,
               "nmi_domain": pt.nmi, "nmi_domain_baseline": pt.nmi_null_mean,
               "nmi_domain_p95": pt.nmi_null_p95, "p_value": pt.p_value, "ami_domain": pt.ami}
    tot = max(tf.sum(), 1)
    p_d = n_d / tot
    for e in range(E):
        for d in range(D):
            if n_d[d] == 0:
                continue
            p_d_given_e = tf[e, d] / tf[e].sum() if tf[e].sum() else float("nan")
            dom_rows.append({
                "layer": layer, "expert": e, "domain": dname[d], "tokens": int(ta[e, d]),
                "share": ta[e, d] / (k * n_d[d]), "share_top1": tf[e, d] / n_d[d],
                "lift": p_d_given_e / p_d[d] if p_d[d] else float("nan"), "uniform": 1.0 / E,
            })
        ne = tf[e].sum()
        lift = (tf[e] / max(ne, 1)) / np.where(p_d > 0, p_d, np.inf)
        top = int(np.argmax(lift)) if ne else -1
        has_null = pt.row_kl_null is not None and ne
        exp_rows.append({
            "layer": layer, "expert": e, "tokens_top1": int(ne),
            "top_domain": dname[top] if top >= 0 else "",
            "top_domain_share": float(tf[e, top] / ne) if ne else float("nan"),
            "top_domain_lift": float(lift[top]) if ne else float("nan"),
            "spec_index_bits": float(pt.row_kl[e]) if ne else float("nan"),
            "spec_index_baseline": float(pt.row_kl_null[e]) if has_null else float("nan"),
            "p_value": float(pt.row_p[e]) if pt.row_p is not None and ne else float("nan"),
        })
    return summary


def _tokens(layer: int, a: _LayerAcc, n_perm: int, rng: np.random.Generator,
            min_token_count: int, token_names: Callable[[int], str] | None,
            tok_rows: list[dict]) -> dict[str, Any]:
    """Per-token rows (appended), and NMI(expert; token id) and the top-expert share over tokens
    seen at least ``min_token_count`` times, against their permutation null."""
    E = a.E
    toks = (a.tok_keys // E).numpy()
    exps = (a.tok_keys % E).numpy()
    uniq, col = np.unique(toks, return_inverse=True)
    table = np.zeros((E, len(uniq)), dtype=np.int64)  # [E, n_token_types] first choices
    np.add.at(table, (exps, col), a.tok_counts.numpy())
    occ = table.sum(0)
    keep = occ >= min_token_count
    sub = table[:, keep]
    if sub.shape[1] >= 2 and sub.sum() > 0:
        tt = _perm_test(sub, n_perm, rng, top_share_min=min_token_count)
        summary = {"nmi_token": tt.nmi, "nmi_token_baseline": tt.nmi_null_mean,
                   "token_p_value": tt.p_value, "ami_token": tt.ami,
                   "top_expert_share": tt.top_share,
                   "top_expert_share_baseline": tt.top_share_null}
    else:
        summary = {"nmi_token": _NAN, "nmi_token_baseline": _NAN, "token_p_value": _NAN,
                   "ami_token": _NAN, "top_expert_share": _NAN,
                   "top_expert_share_baseline": _NAN}
    summary.update({"token_types": len(uniq), "token_types_counted": int(keep.sum())})
    for j, t in enumerate(uniq):
        top = int(table[:, j].argmax())
        tok_rows.append({"layer": layer, "token": int(t),
                         "token_str": token_names(int(t)) if token_names else str(t),
                         "count": int(occ[j]), "top_expert": top,
                         "top_share": table[top, j] / occ[j]})
    return summary


def _consecutive(a: _LayerAcc) -> dict[str, Any]:
    """Tokens t and t+1: same first choice (against sum f^2 and 1/E) and intersecting top-k
    sets (against the reservoir's independent pairs and a uniform router)."""
    E, k = a.E, a.k
    f1 = a.first.numpy().astype(np.float64) / a.n
    uniform_overlap = 1.0 - math.comb(E - k, k) / math.comb(E, k) if E >= 2 * k else 1.0
    return {
        "consecutive_same_top1": a.same_top1 / a.pairs if a.pairs else float("nan"),
        "consecutive_random": float((f1**2).sum()),
        "consecutive_uniform": 1.0 / E,
        "consecutive_overlap_topk": a.overlap_topk / a.pairs if a.pairs else float("nan"),
        "consecutive_overlap_random": _reservoir_overlap(a.res_sets, E),
        "consecutive_overlap_uniform": uniform_overlap,
        "n_pairs": a.pairs,
    }


def _margins(a: _LayerAcc) -> dict[str, Any]:
    """Router margins: mean top-1 minus top-2 weight, logit gap at the top-k boundary, and how
    often either is a near tie."""
    E, k = a.E, a.k
    return {
        "margin_top12": a.margin12_sum / a.n if k >= 2 else float("nan"),
        "near_tie_top12": a.tie12 / a.n if k >= 2 else float("nan"),
        "logit_gap_topk": a.gap_sum / a.n if k < E else float("nan"),
        "near_tie_topk": a.tie_gap / a.n if k < E else float("nan"),
    }


def _cross_layer(acc: RoutingAccumulator, n_perm: int, rng: np.random.Generator) -> list[dict]:
    """NMI between the first choices of every pair of MoE layers, with its permutation null."""
    rows = []
    for (la, lb), joint in acc.cross.items():
        pt = _perm_test(joint.numpy(), max(n_perm // 4, 20) if n_perm else 0, rng)
        rows.append({"layer_a": la, "layer_b": lb, "nmi": pt.nmi, "nmi_baseline": pt.nmi_null_mean,
                     "p_value": pt.p_value,
                     "same_expert_rate": float(np.trace(joint.numpy()) / max(int(joint.sum()), 1))})
    return rows
