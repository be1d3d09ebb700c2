"""The studies' training loop: plain Adam, linear warm-up, no clipping, every step logged.

Why not :func:`interp.train.train`: that trainer clips the global gradient norm at 1.0 and
always warms up, the two things that hide the instability the norm study measures (Xiong et
al. 2020 train post-LN with Adam and show that warm-up, not clipping, is what it needs). Here
the learning rate rises linearly over ``warmup`` steps (0: full rate from the first step) and
then stays at ``lr``; the loss and the global gradient norm of every step are recorded, and a
run whose loss turns non-finite stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from interp.errors import InterpError

__all__ = ["TrainRun", "count_spikes", "seeded", "train_run"]


class TrainRun(NamedTuple):
    """``model`` after training (eval mode), ``history`` (``step, loss, grad_norm, lr``, one
    row per step), and ``nonfinite`` (the loss became NaN or inf; training stopped there)."""

    model: Any
    history: pd.DataFrame
    nonfinite: bool


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.manual_seed(seed)`` inside ``fork_rng``: the initial weights are
    fixed by the seed and the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def count_spikes(losses: np.ndarray, window: int = 20, factor: float = 1.25) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the ``window`` steps before it: a
    loss spike, the usual symptom of an unstable run (non-finite losses count as spikes)."""
    x = np.asarray(losses, dtype=float)
    n = 0
    for t in range(window, len(x)):
        ref = np.median(x[t - window:t])
        if not np.isfinite(x[t]) or x[t] > factor * ref:
            n += 1
    return n


def train_run(
    model: Any,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: Callable[[torch.Generator], torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    extra_loss: Callable[[Any], torch.Tensor] | None = None,
) -> TrainRun:
    """Train ``model`` in place: ``loss_fn(model, batch)`` (+ ``extra_loss(model)``, e.g. a
    span penalty, not logged in ``loss``) with Adam(betas 0.9, 0.98), ``batches(generator)``
    drawing the data from a generator seeded with ``seed``."""
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"steps must be a positive integer, got {steps!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise InterpError(f"warmup must be an integer >= 0, got {warmup!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, float]] = []
    nonfinite = False
    model.train()
    # dropout-free models, but gates and other stochastic parts draw from the global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            rate = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            for g in opt.param_groups:
                g["lr"] = rate
            loss = loss_fn(model, batches(gen))
            total = loss + extra_loss(model) if extra_loss is not None else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            gn = float(torch.stack(grads).norm()) if grads else 0.0
            value = float(loss.detach())
            rows.append({"step": step + 1, "loss": value, "grad_norm": gn, "lr": rate})
            if not (np.isfinite(value) and np.isfinite(gn)):
                nonfinite = True
                break
            opt.step()
    model.eval()
    return TrainRun(model, pd.DataFrame(rows, columns=["step", "loss", "grad_norm", "lr"]),
                    nonfinite)
