"""Single-unit ablation: the measured loss change when one head or one expert is removed.

Heads (Michel et al. 2019, *Are Sixteen Heads Really Better than One?*): zero ablation (its
gate set to 0) and mean ablation (its output ``hook_z`` replaced by its mean over the corpus,
which keeps the average contribution and removes only the token-dependent part). Experts: the
expert masked out of its layer's router, which renormalises over the rest. These are the
ground truth the gradient importances (:mod:`analyses.masking.importance`) are checked against.

:func:`expert_sweep` is the one expert ablation: :func:`expert_ablation` here (mean loss over
labelled batches) and :func:`analyses.moe.expert_ablation` (next-token loss per domain) are the
same sweep with a different measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TypeVar

import pandas as pd
import torch

from analyses import distributed
from analyses.masking.data import LossBatch, _ce_per_seq, layer_of, mean_loss
from analyses.masking.removal import experts_removed, heads_removed, moe_layers
from interp import HookedTransformer
from interp.progress import Progress, no_progress

__all__ = ["expert_ablation", "expert_sweep", "head_ablation", "head_means"]

T = TypeVar("T")


@torch.no_grad()
def head_means(model: HookedTransformer, lbs: Sequence[LossBatch]) -> torch.Tensor:
    """Mean of every head's output ``hook_z`` over all tokens, [n_layers, n_heads, d_head]
    (the replacement value for mean ablation), streamed; in a distributed run each rank sums
    its share of the batches and the sums and the token count are added over the ranks."""
    cfg = model.cfg
    total = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head, dtype=torch.float64,
                        device=model.device)
    count = 0

    def add(z: torch.Tensor, hook: object) -> None:
        total[layer_of(hook.name)] += z.double().sum((0, 1))

    for i, lb in enumerate(lbs):
        if not distributed.mine(i):
            continue
        model.run_with_hooks(lb.inputs, return_type=None,
                             fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), add)])
        count += lb.inputs.shape[0] * lb.inputs.shape[1]
    sums = SimpleNamespace(total=total, count=count)
    distributed.reduce_sums(sums, ["total", "count"])
    return (total / max(sums.count, 1)).float()


def _replace(z: torch.Tensor, hook: object, h: int, value: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[:, :, h] = value.to(z.dtype)
    return z


def _is_resid_pre(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith(".hook_resid_pre")


@torch.no_grad()
def head_ablation(model: HookedTransformer, lbs: Sequence[LossBatch], *,
                  mean_ablation: bool = True, progress: Progress | None = None) -> pd.DataFrame:
    """Loss change when one head is removed: zero ablation (gate 0, Michel et al. 2019) and mean
    ablation (its output replaced by its mean over the corpus). Columns: ``layer, head,
    base_loss, ablation_loss, ablation_delta, mean_ablation_loss, mean_ablation_delta``.

    Removing a head of layer l leaves layers < l untouched, so each batch's residual stream
    entering every layer is cached once and each ablated run starts at its own layer
    (``start_at_layer``): half the compute of full forwards on average, same numbers.

    In a distributed run each rank measures its round-robin share of the (batch, head) pairs
    and the loss sums are added over the ranks (the token count is every rank's own, from the
    labels): the one-process numbers.
    """
    progress = progress or no_progress
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    base = mean_loss(model, lbs)
    means = head_means(model, lbs) if mean_ablation else None
    zero_sum = torch.zeros(L, H, dtype=torch.float64)
    mean_sum = torch.zeros(L, H, dtype=torch.float64)
    count = 0
    resid: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: object) -> None:
        resid[layer_of(hook.name)] = x.detach()

    def loss_from(lb: LossBatch, layer: int) -> torch.Tensor:
        logits = model(lb.inputs, start_at_layer=layer, residual=resid[layer])
        return _ce_per_seq(logits, lb.labels)

    units = [(layer, h) for layer in range(L) for h in range(H)]
    for i, lb in enumerate(lbs):
        count += int((lb.labels != -100).sum())
        mine = [u for j, u in enumerate(units) if distributed.mine(i * len(units) + j)]
        if not mine:
            continue
        resid.clear()
        model.run_with_hooks(lb.inputs, return_type=None, fwd_hooks=[(_is_resid_pre, keep)])
        desc = "head ablation" + (f" (batch {i + 1}/{len(lbs)})" if len(lbs) > 1 else "")
        for layer, h in progress(mine, desc=desc, total=len(mine)):
            with heads_removed(model, [(layer, h)]):
                s, _ = loss_from(lb, layer)
            zero_sum[layer, h] += float(s.double().sum())
            if means is not None:
                hook = functools.partial(_replace, h=h, value=means[layer, h])
                with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]):
                    s, _ = loss_from(lb, layer)
                mean_sum[layer, h] += float(s.double().sum())
    sums = SimpleNamespace(zero_sum=zero_sum, mean_sum=mean_sum)
    distributed.reduce_sums(sums, ["zero_sum", "mean_sum"])
    rows = []
    for layer, h in units:
        zl = float(zero_sum[layer, h]) / max(count, 1)
        row = {"layer": layer, "head": h, "base_loss": base, "ablation_loss": zl,
               "ablation_delta": zl - base}
        if means is not None:
            ml = float(mean_sum[layer, h]) / max(count, 1)
            row.update(mean_ablation_loss=ml, mean_ablation_delta=ml - base)
        rows.append(row)
    return pd.DataFrame(rows)


def expert_sweep(model: HookedTransformer, layers: Sequence[int], measure: Callable[[], T], *,
                 progress: Progress | None = None, desc: str = "expert ablation",
                 shard_units: bool = False) -> tuple[T, list[tuple[int, int, T | None]]]:
    """``measure()`` with every expert, then once per expert of ``layers`` with that expert
    masked out of its layer's router (:func:`experts_removed`: the router renormalises over
    the rest; all experts back after): ``(base, [(layer, expert, measured), ...])``, measured
    None where a layer has only top_k experts, so none can go.

    ``shard_units``: in a distributed run each rank masks its round-robin share of the experts
    and the measurements are gathered in order (``measure`` must then be a local computation;
    :mod:`analyses.moe` instead shards the batches inside its ``measure``)."""
    progress = progress or no_progress
    E, k = model.cfg.n_experts, model.cfg.experts_per_token
    base = measure()
    units = [(layer, e) for layer in layers for e in range(E)]
    local: dict[int, T | None] = {}
    for i, (layer, e) in enumerate(progress(units, desc=desc, total=len(units))):
        if shard_units and not distributed.mine(i):
            continue
        local[i] = None
        if E > k:
            with experts_removed(model, [(layer, e)]):
                local[i] = measure()
    got = distributed.gather_in_order(local, len(units)) if shard_units else \
        [local[i] for i in range(len(units))]
    return base, [(layer, e, g) for (layer, e), g in zip(units, got, strict=True)]


@torch.no_grad()
def expert_ablation(model: HookedTransformer, lbs: Sequence[LossBatch], *,
                    progress: Progress | None = None) -> pd.DataFrame:
    """Loss change when one expert is masked out of its layer's router (:func:`expert_sweep`).
    Columns: ``layer, expert, base_loss, ablation_loss, ablation_delta`` (NaN when a layer has
    only top_k experts, so none can go). Distributed: each rank masks its share of the
    experts."""
    base, swept = expert_sweep(model, moe_layers(model), lambda: mean_loss(model, lbs),
                               progress=progress, shard_units=True)
    rows = []
    for layer, e, loss in swept:
        loss = float("nan") if loss is None else loss
        rows.append({"layer": layer, "expert": e, "base_loss": base, "ablation_loss": loss,
                     "ablation_delta": loss - base})
    return pd.DataFrame(rows)
