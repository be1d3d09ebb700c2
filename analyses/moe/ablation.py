"""Expert ablation per domain: the loss change when one expert is removed, and which domain it
hurts.

The sweep itself (each expert masked out of its router in turn, the router renormalising over
the rest) is :func:`analyses.masking.ablation.expert_sweep`, the one expert ablation of the
package; here it measures next-token loss per domain (the domain of the predicted token), on a
corpus held in memory because it is re-run once per expert. Method: expert masking as in Jiang
et al. 2024 (Mixtral) sec. 5 and the head-ablation protocol of Michel et al. 2019.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from analyses import distributed
from analyses.masking.ablation import expert_sweep
from analyses.moe.inputs import _as_batch, moe_layers
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress

__all__ = ["ablation_summary", "expert_ablation"]

Held = list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]
_COLUMNS = ["layer", "expert", "domain", "n_tokens", "loss_base", "loss_ablated", "delta",
            "delta_rel"]


def _per_token_loss(model: HookedTransformer, tokens: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy [batch, pos-1] and its validity mask."""
    with torch.inference_mode():
        logits = model(tokens.to(model.device),
                       attention_mask=None if mask is None else mask.long().to(model.device))
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                         tokens[:, 1:].reshape(-1).to(logits.device),
                         reduction="none").view(tokens.shape[0], -1).cpu()
    ok = torch.ones_like(ce, dtype=torch.bool) if mask is None else (mask[:, :-1] & mask[:, 1:])
    return ce, ok


def _domain_losses(model: HookedTransformer, held: Held,
                   names: list[str]) -> dict[str, tuple[float, int]]:
    """Mean next-token loss and token count per domain of the predicted token, and over every
    token ("all"); unnamed domain ids are named by their number. In a distributed run each
    rank takes every ``size``-th batch and the (sum, count) pairs are added over the ranks."""
    sums: dict[int, list[float]] = {}
    w = distributed.world()
    for tokens, domains, mask in held[w.rank::w.size]:
        ce, ok = _per_token_loss(model, tokens, mask)
        d = domains[:, 1:] if domains is not None else torch.full_like(ce, -1, dtype=torch.long)
        for key in [-2, *sorted(int(x) for x in d[ok].unique() if int(x) >= 0)]:
            sel = ok if key == -2 else ok & (d == key)
            s = sums.setdefault(key, [0.0, 0])
            s[0] += float(ce[sel].sum())
            s[1] += int(sel.sum())
    if w.size > 1:
        sums = _add_over_ranks(sums)
    return {("all" if key == -2 else (names[key] if key < len(names) else str(key))):
            (s[0] / max(s[1], 1), s[1]) for key, s in sums.items()}


def _add_over_ranks(sums: dict[int, list[float]]) -> dict[int, list[float]]:
    """Per-domain (loss sum, token count) of every rank, added in rank order."""
    total: dict[int, list[float]] = {}
    for part in distributed.gather_objects(sums):
        for key, (loss, count) in part.items():
            s = total.setdefault(key, [0.0, 0])
            s[0] += loss
            s[1] += count
    return dict(sorted(total.items()))


def _hold(batches: Iterable[Any], max_tokens: int) -> Held:
    """The corpus cut at ``max_tokens`` (whole batches), held for the re-runs."""
    held, n = [], 0
    for item in batches:
        tokens, domains, mask = _as_batch(item)
        held.append((tokens, domains, mask))
        n += int(tokens.numel() if mask is None else mask.sum())
        if n >= max_tokens:
            break
    if not held:
        raise InterpError("The ablation corpus is empty; give it some text or a domain stream.")
    return held


def _checked_layers(model: HookedTransformer, layers: Sequence[int] | None) -> list[int]:
    """``layers`` (default: every MoE layer) after the checks that make ablation meaningful."""
    all_layers = moe_layers(model)
    if model.cfg.architecture != "decoder":
        raise InterpError("Expert ablation measures next-token loss and needs a decoder; this "
                          "model is an encoder.")
    layers = list(all_layers if layers is None else layers)
    bad = [x for x in layers if x not in all_layers]
    if bad:
        raise InterpError(f"Layers {bad} are not MoE layers; MoE layers: {all_layers}.")
    if model.cfg.experts_per_token >= model.cfg.n_experts:
        raise InterpError("Every expert is always routed (top_k = n_experts); masking one would "
                          "leave fewer than top_k.")
    return layers


def expert_ablation(model: HookedTransformer, batches: Iterable[Any], *,
                    layers: Sequence[int] | None = None,
                    domain_names: Sequence[str] | None = None, max_tokens: int = 20000,
                    progress: Progress | None = None) -> pd.DataFrame:
    """Loss change per domain when one expert is removed (``model.set_expert_mask``; the router
    renormalises over the remaining experts), for every expert of ``layers`` (default: all MoE
    layers). The corpus is cut at ``max_tokens`` tokens and held in memory (it is re-run once
    per expert); the loss of a position is attributed to the domain of the token it predicts.

    Columns: layer, expert, domain ("all" = every token), n_tokens, loss_base, loss_ablated,
    delta (ablated - base, nats/token), delta_rel (delta / loss_base). Method: expert masking as
    in Jiang et al. 2024 (Mixtral) sec. 5 and the head-ablation protocol of Michel et al. 2019.
    """
    layers = _checked_layers(model, layers)
    held = _hold(batches, max_tokens)
    names = list(domain_names or [])
    was_training = model.training
    model.eval()
    try:
        base, swept = expert_sweep(model, layers, lambda: _domain_losses(model, held, names),
                                   progress=progress, desc="ablation")
    finally:
        model.train(was_training)
    rows = []
    for layer, e, abl in swept:
        for dom, (loss, cnt) in abl.items():
            b = base[dom][0]
            rows.append({"layer": layer, "expert": e, "domain": dom, "n_tokens": cnt,
                         "loss_base": b, "loss_ablated": loss, "delta": loss - b,
                         "delta_rel": (loss - b) / b if b else float("nan")})
    return pd.DataFrame(rows, columns=_COLUMNS)


def ablation_summary(ablation: pd.DataFrame, experts: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (layer, domain): the expert whose removal hurts that domain most, how much, and how
    specific that is (its delta on the domain minus its mean delta on the other domains). With
    ``experts`` (from :func:`routing_stats`), also the expert routing ties most to the domain
    (highest lift) and whether ablating it hurts that domain more than every other domain."""
    df = ablation[ablation["domain"] != "all"]
    rows = []
    for (layer, dom), g in df.groupby(["layer", "domain"], sort=True):
        best = g.loc[g["delta"].idxmax()]
        same_expert = (df["layer"] == layer) & (df["expert"] == best["expert"])
        others = df[same_expert & (df["domain"] != dom)]["delta"]
        row = {"layer": layer, "domain": dom, "most_hurting_expert": int(best["expert"]),
               "delta": float(best["delta"]),
               "delta_other_domains": float(others.mean()) if len(others) else float("nan"),
               "specificity": float(best["delta"] - others.mean()) if len(others)
               else float("nan")}
        if experts is not None and len(experts):
            row.update(_routing_expert(df, experts, layer, dom))
        rows.append(row)
    return pd.DataFrame(rows)


def _routing_expert(df: pd.DataFrame, experts: pd.DataFrame, layer: int,
                    dom: str) -> dict[str, Any]:
    """The expert routing ties most to ``dom`` in ``layer`` (highest lift), its ablation delta
    on ``dom`` and on the other domains, and whether ``dom`` is the domain it hurts most
    (empty when no expert's top domain is ``dom``)."""
    ex = experts[(experts["layer"] == layer) & (experts["top_domain"] == dom)]
    if not len(ex):
        return {}
    tied = int(ex.loc[ex["top_domain_lift"].idxmax()]["expert"])
    d_tied = df[(df["layer"] == layer) & (df["expert"] == tied)].set_index("domain")["delta"]
    return {"routing_expert": tied,
            "routing_expert_delta": float(d_tied.get(dom, float("nan"))),
            "routing_expert_delta_other": float(d_tied.drop(dom).mean()) if len(d_tied) > 1
            else float("nan"),
            "routing_expert_hurts_own_most": bool(d_tied.idxmax() == dom)}
