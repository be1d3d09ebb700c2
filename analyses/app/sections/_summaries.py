"""The summaries of the masking, MoE and FFN sections: three to five findings each.

A summary is what a reader sees first (:mod:`analyses.app.summary`), so every number in it is
read from a frame the section also writes as a CSV (named in each docstring): a summary
cannot say something the data does not. Where a part did not run or found nothing, the
summary says so and why, instead of leaving a gap. These live here, not in the section
modules, to keep those under the size limit.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["ffn_summary", "masking_summary", "moe_summary"]


def _g(x: Any) -> str:
    """A number to 3 significant digits, ``n/a`` when missing or not finite."""
    x = float(x)
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


# --------------------------------------------------------------------------- masking


def masking_summary(tables: dict[str, pd.DataFrame], removable: dict[str, int],
                    has_head: bool, head_note: str | None) -> list[str]:
    """From ``mask_strategies.csv``, ``head_importance.csv`` and ``expert_importance.csv``:
    the strongest and weakest strategy, the opposite mask, how many heads (experts) can go
    within a 5% loss rise and the costliest single removal; ``head_note`` says why head
    masking did not run, when it did not."""
    table = tables["mask_strategies"]
    metric, what = ("kl", "output KL") if has_head else ("hidden_cos_delta", "1 - cosine")
    rows = table[table["strategy"] != "baseline"]
    out = []
    if len(rows):
        big = rows.loc[rows[metric].astype(float).idxmax()]
        out.append(f"Largest effect of {len(rows)} mask strategies: {big['label']} ({what} "
                   f"{_g(big[metric])}, mean JS {_g(big['mean_js'])} bits).")
        for label in ("bidirectional", "causal"):
            if label in set(rows["label"]) and label != big["label"]:
                r = rows[rows["label"] == label].iloc[0]
                out.append(f"{label.capitalize()} mask: {what} {_g(r[metric])}, mean JS "
                           f"{_g(r['mean_js'])} bits.")
    else:
        out.append("No mask strategy besides the baseline was run.")
    for unit, name in (("head", "head_importance"), ("expert", "expert_importance")):
        if name not in tables or unit not in removable:
            continue
        imp = tables[name]
        worst = imp.loc[imp["ablation_delta"].idxmax()]
        out.append(f"{removable[unit]} of {len(imp)} {unit}s can be removed before the loss "
                   f"rises by 5%; removing L{int(worst['layer'])}{unit[0].upper()}"
                   f"{int(worst[unit])} alone changes it by {worst['ablation_delta']:+.3f} "
                   "nats/token.")
    if head_note:
        out.append(head_note)
    return out[:5]


# --------------------------------------------------------------------------- MoE


def moe_summary(summary: pd.DataFrame, experts: pd.DataFrame | None,
                ablation: pd.DataFrame | None, ablation_summary: pd.DataFrame | None,
                ablation_note: str | None) -> list[str]:
    """From ``moe_summary.csv``, ``moe_experts.csv``, ``moe_ablation.csv`` and
    ``moe_ablation_summary.csv``: load balance, domain and token specialisation, and what
    masking an expert costs (or why that was not measured)."""
    s = summary
    E, k = int(s["n_experts"].iloc[0]), int(s["top_k"].iloc[0])
    out = [f"{E} experts, top-{k}, {int(s['n_tokens'].iloc[0])} tokens per layer: coefficient "
           f"of variation of the load up to {_g(s['cv_topk'].max())} (random assignment "
           f"{_g(s['cv_random'].iloc[0])})."]
    if "nmi_domain" in s and s["nmi_domain"].notna().any():
        b = s.loc[s["nmi_domain"].idxmax()]
        verdict = ("Experts specialise by domain" if b["p_value"] <= 0.01 else
                   "No domain specialisation at p <= 0.01")
        out.append(f"{verdict}: NMI(expert; domain) {_g(b['nmi_domain'])} in layer "
                   f"{int(b['layer'])} vs {_g(b['nmi_domain_baseline'])} with shuffled labels "
                   f"(p = {_g(b['p_value'])}).")
        ex = experts.dropna(subset=["p_value"]) if experts is not None else pd.DataFrame()
        if len(ex):
            sig = ex[ex["p_value"] <= 0.01]
            text = (f"{len(sig)} of {len(ex)} (layer, expert) pairs route a domain mix unlike "
                    "the corpus (p <= 0.01)")
            if len(sig):
                r = sig.sort_values("spec_index_bits", ascending=False).iloc[0]
                text += (f"; the most specialised, L{int(r['layer'])}E{int(r['expert'])}, takes "
                         f"{r['top_domain_share']:.0%} of its tokens from {r['top_domain']}")
            out.append(text + ".")
    else:
        out.append("The corpus has no domain labels: domain specialisation was not measured.")
    if s["nmi_token"].notna().any():
        b = s.loc[s["nmi_token"].idxmax()]
        out.append(f"Routing follows the token id: in layer {int(b['layer'])} a token's most "
                   f"common expert takes {_g(b['top_expert_share'])} of its occurrences "
                   f"(chance {_g(b['top_expert_share_baseline'])}).")
    if ablation_summary is not None and len(ablation_summary):
        r = ablation_summary.sort_values("specificity", ascending=False).iloc[0]
        out.append(f"Masking L{int(r['layer'])}E{int(r['most_hurting_expert'])} costs "
                   f"{r['domain']} {r['delta']:+.3f} nats/token vs "
                   f"{r['delta_other_domains']:+.3f} on the other domains.")
    elif ablation is not None and len(ablation):
        a = ablation[ablation["domain"] == "all"]
        r = a.loc[a["delta"].idxmax()]
        out.append(f"Masking L{int(r['layer'])}E{int(r['expert'])} hurts most: "
                   f"{r['delta']:+.3f} nats/token.")
    elif ablation_note:
        out.append(ablation_note)
    return out[:5]


# --------------------------------------------------------------------------- FFN


def ffn_summary(res: dict[str, Any]) -> list[str]:
    """From ``ffn_facts.csv``, ``ffn_trace_average.csv``, ``ffn_edit_summary.csv``,
    ``logit_lens.csv`` and ``kv_agreement.csv`` (``res`` is :func:`analyses.ffn.analyse`'s
    result): how many facts the model knows, where restoring the MLP matters most, what
    suppressing knowledge neurons does, and the key-value agreement."""
    pred = res["predictions"]
    n_known = int(pred["known"].sum())
    out = [f"The model answers {n_known} of {len(pred)} facts (greedy next token); "
           f"{len(res['facts'])} are analysed."]
    if not res["facts"]:
        out.append("No fact is answered correctly, so causal tracing, knowledge neurons and "
                   "the logit lens were not run.")
    else:
        avg = res["trace_average"]
        for kind, what in (("mlp", "MLP restoration (window)"), ("resid", "residual stream")):
            sub = avg[(avg["corruption"] == "noise") & (avg["kind"] == kind)]
            if len(sub):
                b = sub.loc[sub["aie"].idxmax()]
                out.append(f"Causal tracing (noise): {what} peaks at the "
                           f"{str(b['role']).replace('_', ' ')} token, layer {int(b['layer'])} "
                           f"(AIE {_g(b['aie'])}).")
        es = res["edit_summary"]
        sup = es[(es["mode"] == "suppress") & (es["target"] == "self")] if len(es) else es
        if len(sup):
            out.append(f"Suppressing a fact's knowledge neurons changes its answer's probability "
                       f"by {100 * float(sup['mean_rel_change'].iloc[0]):+.1f}% on average.")
        else:
            out.append("No fact kept a knowledge neuron after refinement, so nothing was edited.")
    ag = res["kv_agreement"]
    if len(ag):
        upper = ag[ag["layer"] >= ag["layer"].max() / 2]
        out.append(f"Key-value memories: in the upper layers a value's top token is the next "
                   f"token of its top trigger for {100 * float(upper['agreement_top1'].mean()):.1f}"
                   f"% of neurons (shuffled {100 * float(upper['baseline_top1'].mean()):.1f}%).")
    return out[:5]
