"""What learned masks learned: spans per head, hard-concrete gates, and their agreement with
Michel et al.'s importance.

A model built with ``adaptive_span=True`` (Sukhbaatar et al. 2019) or ``l0_head_gates=True``
(Voita et al. 2019) carries its masks as parameters; these functions read them into tidy
frames. :func:`gate_importance_agreement` puts a gate table beside
:func:`analyses.masking.head_importance`'s: heads the L0 penalty closes should be the ones whose
gate gradient said they matter least.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from interp.errors import InterpError

__all__ = ["gate_importance_agreement", "learned_gates", "learned_mask_tables", "learned_spans"]


def _attn_layers(model: Any) -> list[tuple[int, Any]]:
    return [(i, blk.attn) for i, blk in enumerate(model.blocks)]


@torch.no_grad()
def learned_spans(model: Any) -> pd.DataFrame:
    """One row per head: ``layer, head, span`` (z, in positions: keys up to z back are fully
    seen), ``reach`` (z + ramp: no key further back is seen at all), ``span_frac`` (z / n_ctx)."""
    rows = []
    for layer, attn in _attn_layers(model):
        if attn.span is None:
            continue
        z = attn.span.spans.float().cpu()
        for h in range(len(z)):
            rows.append({"layer": layer, "head": h, "span": float(z[h]),
                         "reach": float(z[h]) + attn.span.ramp,
                         "span_frac": float(z[h]) / attn.span.max_span})
    if not rows:
        raise InterpError("This model has no learned spans; build it with adaptive_span=True.")
    return pd.DataFrame(rows, columns=["layer", "head", "span", "reach", "span_frac"])


@torch.no_grad()
def learned_gates(model: Any) -> pd.DataFrame:
    """One row per head: ``layer, head, log_alpha``, ``gate`` (the deterministic evaluation
    gate in [0, 1]), ``open_probability`` (P(gate != 0), the L0 term), ``pruned`` (gate == 0:
    the head's output is removed exactly)."""
    rows = []
    for layer, attn in _attn_layers(model):
        if attn.gates is None:
            continue
        was = attn.gates.training
        attn.gates.eval()
        gate = attn.gates().float().cpu()
        attn.gates.train(was)
        la = attn.gates.log_alpha.float().cpu()
        p_open = attn.gates.open_probability().float().cpu()
        for h in range(len(gate)):
            rows.append({"layer": layer, "head": h, "log_alpha": float(la[h]),
                         "gate": float(gate[h]), "open_probability": float(p_open[h]),
                         "pruned": bool(gate[h] == 0)})
    if not rows:
        raise InterpError("This model has no head gates; build it with l0_head_gates=True.")
    cols = ["layer", "head", "log_alpha", "gate", "open_probability", "pruned"]
    return pd.DataFrame(rows, columns=cols)


def gate_importance_agreement(gates: pd.DataFrame, importance: pd.DataFrame) -> dict[str, float]:
    """Spearman rank correlation of the learned gates' ``log_alpha`` with Michel et al.'s
    ``importance`` (both frames keyed by ``layer, head``), and how many heads were pruned.

    ``spearman_gate`` ranks by the evaluation gate instead, pruned heads tied at 0: the
    log-alpha of heads the penalty closed differ by noise only (all near -7), which the plain
    ``spearman`` ranks as if it meant something.

    ``importance_pruned`` / ``importance_kept``: mean importance of the pruned and the kept
    heads (the gates agree when the pruned ones are the least important)."""
    from scipy.stats import spearmanr

    both = gates.merge(importance, on=["layer", "head"], how="inner")
    if len(both) < 3:
        raise InterpError("Gate and importance tables share fewer than 3 heads; compute both "
                          "on the same model.")
    x, y = both["log_alpha"].to_numpy(float), both["importance"].to_numpy(float)
    g = both["gate"].to_numpy(float)

    def rank_corr(a: np.ndarray) -> float:
        return float(spearmanr(a, y).statistic) if np.ptp(a) > 0 and np.ptp(y) > 0 else np.nan

    rho = rank_corr(x)
    pruned = both["pruned"].to_numpy(bool)

    def mean(m: np.ndarray) -> float:
        return float(y[m].mean()) if m.any() else float("nan")

    return {"spearman": rho, "spearman_gate": rank_corr(g), "n_heads": len(both),
            "n_pruned": int(pruned.sum()),
            "pruned_fraction": float(pruned.mean()), "importance_pruned": mean(pruned),
            "importance_kept": mean(~pruned)}


def learned_mask_tables(model: Any, importance: pd.DataFrame | None = None
                        ) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The masking report's part for a model with learned masks: tables ``learned_spans`` and
    ``learned_gates`` (those it has) and one finding line each; with ``importance``
    (:func:`analyses.masking.head_importance`) the gates' Spearman agreement with it. A model
    without learned masks gives ``({}, [])``."""
    attns = [attn for _, attn in _attn_layers(model)]
    tables: dict[str, pd.DataFrame] = {}
    findings: list[str] = []
    if any(a.span is not None for a in attns):
        spans = learned_spans(model)
        tables["learned_spans"] = spans
        findings.append(f"Learned attention spans (Sukhbaatar et al. 2019): median "
                        f"{spans['span'].median():.1f} positions, range "
                        f"{spans['span'].min():.1f}-{spans['span'].max():.1f} (ramp "
                        f"{model.cfg.span_ramp}).")
    if any(a.gates is not None for a in attns):
        gates = learned_gates(model)
        tables["learned_gates"] = gates
        line = (f"Hard-concrete head gates (Voita et al. 2019): {int(gates['pruned'].sum())} of "
                f"{len(gates)} heads pruned (gate exactly 0).")
        if importance is not None and len(gates) >= 3:
            rho = gate_importance_agreement(gates, importance)["spearman"]
            line += (f" Spearman(log_alpha, Michel importance) = {rho:.2f}." if np.isfinite(rho)
                     else " Spearman with Michel importance undefined (untrained gates are all "
                     "equal).")
        findings.append(line)
    return tables, findings
