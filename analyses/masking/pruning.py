"""Pruning curves: the loss as more and more heads (or experts) are removed.

Michel et al. 2019 (*Are Sixteen Heads Really Better than One?*, sec. 4): remove the least
important units first and watch the loss, against random removal orders; :func:`max_removable`
finds how many can go before the loss rises by more than a tolerance, and
:func:`importance_correlations` checks the gradient importances against measured ablations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from analyses import distributed
from analyses.masking.data import LossBatch, mean_loss
from analyses.masking.removal import Unit, experts_removed, heads_removed, n_effective
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress, no_progress

__all__ = ["expert_pruning_curves", "head_pruning_curves", "importance_correlations",
           "max_removable"]


def _fractions(n_units: int, steps: int) -> list[int]:
    return sorted({round(i * n_units / steps) for i in range(steps + 1)})


def _curves(model: HookedTransformer, lbs: Sequence[LossBatch], units: Sequence[Unit],
            importance: Sequence[float], removed_ctx: Callable, *, steps: int, n_random: int,
            seed: int, progress: Progress, what: str,
            effective: Callable[[Sequence[Unit]], int] = len) -> pd.DataFrame:
    base = mean_loss(model, lbs)
    by_importance = np.argsort(np.asarray(importance, dtype=float), kind="stable")
    orders = [("importance", 0, [units[i] for i in by_importance])]
    rng = np.random.default_rng(seed)
    for r in range(n_random):
        orders.append(("random", r, [units[i] for i in rng.permutation(len(units))]))
    counts = _fractions(len(units), steps)
    points = [(o, k) for o in range(len(orders)) for k in counts if k > 0]
    local = {}  # this rank's round-robin share of the curve points (all of them in one process)
    for i, (o, k) in enumerate(progress(points, desc=f"{what} pruning curves", total=len(points))):
        if distributed.mine(i):
            with removed_ctx(model, orders[o][2][:k]):
                local[i] = mean_loss(model, lbs)
    losses = dict(zip(points, distributed.gather_in_order(local, len(points)), strict=True))
    rows = []
    for o, (name, run, order) in enumerate(orders):
        for k in counts:
            loss = base if k == 0 else losses[o, k]
            rows.append({"order": name, "run": run, "n_removed": k,
                         "n_effective": effective(order[:k]), "fraction": k / len(units),
                         "loss": loss, "loss_ratio": loss / base if base else float("nan")})
    return pd.DataFrame(rows)


def _check_steps(steps: int, n_random: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"Pruning needs at least one step, got steps={steps!r}.")
    if not isinstance(n_random, int) or n_random < 0:
        raise InterpError(f"n_random must be an integer >= 0, got {n_random!r}.")


def head_pruning_curves(model: HookedTransformer, lbs: Sequence[LossBatch],
                        importance: pd.DataFrame, *, steps: int = 20, n_random: int = 3,
                        seed: int = 0, progress: Progress | None = None) -> pd.DataFrame:
    """Loss against the fraction of heads removed (gates set to 0), removing the least important
    first (Michel et al. 2019, sec. 4) and in ``n_random`` random orders. Columns: ``order``
    (importance / random), ``run``, ``n_removed`` (= ``n_effective``), ``fraction``, ``loss``,
    ``loss_ratio`` (to the unpruned loss). In a distributed run each rank measures its
    round-robin share of the curve points and they are gathered in order."""
    _check_steps(steps, n_random)
    units = list(zip(importance["layer"].astype(int), importance["head"].astype(int),
                     strict=True))
    return _curves(model, lbs, units, importance["importance"].to_numpy(), heads_removed,
                   steps=steps, n_random=n_random, seed=seed, progress=progress or no_progress,
                   what="head")


def expert_pruning_curves(model: HookedTransformer, lbs: Sequence[LossBatch],
                          importance: pd.DataFrame, *, steps: int = 10, n_random: int = 3,
                          seed: int = 0, progress: Progress | None = None) -> pd.DataFrame:
    """As :func:`head_pruning_curves` for experts. Each layer keeps at least top_k experts, so
    the last removals of a layer are no-ops; ``n_effective`` counts the experts really masked."""
    _check_steps(steps, n_random)
    units = list(zip(importance["layer"].astype(int), importance["expert"].astype(int),
                     strict=True))
    return _curves(model, lbs, units, importance["importance"].to_numpy(), experts_removed,
                   steps=steps, n_random=n_random, seed=seed, progress=progress or no_progress,
                   what="expert", effective=functools.partial(n_effective, model))


@torch.no_grad()
def max_removable(model: HookedTransformer, lbs: Sequence[LossBatch], importance: pd.DataFrame,
                  curve: pd.DataFrame, *, tolerance: float = 0.05, unit: str = "head") -> int:
    """How many units can go, least important first, before the loss first rises by more than
    ``tolerance`` (relative): the coarse importance-order curve brackets the crossing, then one
    unit at a time inside the bracket gives the exact count. In a distributed run the ranks
    try the next ``size`` counts at once, one each, and stop at the first round that crosses:
    the one-process answer."""
    imp = curve[curve["order"] == "importance"].sort_values("n_removed")
    over = imp[imp["loss_ratio"] > 1 + tolerance]
    if over.empty:
        return int(imp["n_effective"].max())
    first_bad = int(over["n_removed"].iloc[0])
    ok = imp[(imp["n_removed"] < first_bad)]
    lo = int(ok["n_removed"].max()) if not ok.empty else 0
    units = list(zip(importance["layer"].astype(int), importance[unit].astype(int), strict=True))
    scores = importance["importance"].to_numpy(dtype=float)
    order = [units[i] for i in np.argsort(scores, kind="stable")]
    ctx = heads_removed if unit == "head" else experts_removed
    count = len if unit == "head" else functools.partial(n_effective, model)
    base = float(imp["loss"].iloc[0])
    todo = list(range(lo + 1, first_bad))
    size = distributed.world().size
    for start in range(0, len(todo), size):  # one k per rank per round, checked in order
        ks = todo[start:start + size]
        local = {}
        for j, k in enumerate(ks):
            if distributed.mine(j):
                with ctx(model, order[:k]):
                    local[j] = mean_loss(model, lbs)
        for k, loss in zip(ks, distributed.gather_in_order(local, len(ks)), strict=True):
            if loss > (1 + tolerance) * base:
                return count(order[:k - 1])
    return count(order[:first_bad - 1])


def importance_correlations(table: pd.DataFrame) -> dict[str, float]:
    """Spearman rank correlations of the importance scores with the measured ablation effects."""
    from scipy.stats import spearmanr

    out = {}
    pairs = [("importance", "ablation_delta"), ("predicted_delta", "ablation_delta"),
             ("abs_mean_gradient", "ablation_delta"), ("importance", "mean_ablation_delta"),
             ("predicted_delta", "mean_ablation_delta")]
    for a, b in pairs:
        if a in table and b in table and len(table) > 2:
            x, y = table[a].to_numpy(float), table[b].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() > 2 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                out[f"{a}~{b}"] = float(spearmanr(x[ok], y[ok]).statistic)
    return out
