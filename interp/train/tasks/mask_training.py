"""Training with learned masks: the task loss plus the span and L0 penalties of the papers.

``loss = CE + span_coef * sum_heads z / n_ctx + l0_coef * sum_heads P(gate != 0)``: the L1
span loss of Sukhbaatar et al. (2019) and the L0 term Voita et al. (2019) prune heads with.
``masks_only`` trains nothing but the mask parameters, which is how the pruning of an already
trained model is measured (its weights stay those the masking analysis reads).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from interp.components.learned_masks import AdaptiveSpan, l0_penalty, span_penalty
from interp.errors import InterpError
from interp.train.tasks.base import Task

__all__ = ["MASK_PARAMETERS", "fit_learned_masks", "with_learned_masks"]

#: parameter names (last part) of the learned masks
MASK_PARAMETERS = ("span_frac", "log_alpha")


def with_learned_masks(model: Any, **flags: Any) -> Any:
    """A copy of ``model`` whose config turns on learned masks (``adaptive_span=True``,
    ``l0_head_gates=True``, ``selective_attention=True``, ``span_ramp``): every weight of the
    original, the new mask parameters at their initial values (full span, gates at 1), so at
    evaluation it computes exactly what ``model`` does until the masks are trained."""
    from interp.model import build_model

    unknown = sorted(set(flags) - {"adaptive_span", "l0_head_gates", "selective_attention",
                                   "span_ramp"})
    if unknown:
        raise InterpError(f"with_learned_masks takes only learned-mask flags, got "
                          f"{', '.join(unknown)}.")
    try:
        cfg = model.cfg.replace(**flags)
    except ValueError as e:
        raise InterpError(str(e)) from None
    new = build_model(cfg, tokenizer=getattr(model, "tokenizer", None))
    dev = next(model.parameters()).device
    new = new.to(dev)
    res = new.load_state_dict(model.state_dict(), strict=False)
    extra = [k for k in res.missing_keys if k.rsplit(".", 1)[-1] not in MASK_PARAMETERS]
    if extra or res.unexpected_keys:  # cannot happen for a model of this package
        raise InterpError(f"with_learned_masks could not copy the weights: missing {extra}, "
                          f"unexpected {res.unexpected_keys}.")
    return new.eval()


def _mask_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in MASK_PARAMETERS]


def fit_learned_masks(
    model: Any,
    task: Task,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    span_coef: float = 0.0,
    l0_coef: float = 0.0,
    masks_only: bool = False,
    seed: int = 0,
    log_every: int = 50,
) -> pd.DataFrame:
    """Train ``model`` in place on ``task`` with Adam; one history row per ``log_every`` steps
    (columns ``step, loss, span_penalty, l0_penalty``). Spans are kept in [0, n_ctx]."""
    masks = _mask_params(model)
    if masks_only and not masks:
        raise InterpError("masks_only trains the learned masks, but this model has none; build "
                          "it with adaptive_span=True or l0_head_gates=True.")
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"steps must be a positive integer, got {steps!r}.")
    params = masks if masks_only else [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if masks_only and all(p is not m for m in masks)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    model.train()
    # the gates' noise comes from torch's global generator: seed it inside fork_rng, which
    # restores the caller's state afterwards (a seeded run, no process-wide side effect)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return _loop(model, task, opt, gen, dev, frozen, steps=steps, batch_size=batch_size,
                     span_coef=span_coef, l0_coef=l0_coef, log_every=log_every)


def _loop(model: Any, task: Task, opt: torch.optim.Optimizer, gen: torch.Generator,
          dev: torch.device, frozen: list[torch.nn.Parameter], *, steps: int, batch_size: int,
          span_coef: float, l0_coef: float, log_every: int) -> pd.DataFrame:
    """The optimisation steps of :func:`fit_learned_masks`; unfreezes ``frozen`` at the end."""
    rows: list[dict[str, float]] = []
    try:
        for step in range(1, steps + 1):
            batch = task.sample(batch_size, gen)
            logits = model(batch.tokens.to(dev))
            ce = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.to(dev).flatten(),
                                 ignore_index=-100)
            sp, l0 = span_penalty(model).to(dev), l0_penalty(model).to(dev)
            opt.zero_grad(set_to_none=True)
            (ce + span_coef * sp + l0_coef * l0).backward()
            opt.step()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, AdaptiveSpan):
                        m.span_frac.clamp_(0.0, 1.0)
            if step % log_every == 0 or step == steps:
                rows.append({"step": step, "loss": float(ce.detach()),
                             "span_penalty": float(sp.detach()),
                             "l0_penalty": float(l0.detach())})
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return pd.DataFrame(rows, columns=["step", "loss", "span_penalty", "l0_penalty"])
