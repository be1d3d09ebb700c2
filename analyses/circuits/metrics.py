"""Metrics of a patched run, per pair, read at the last position.

Each metric maps the last-position logits [batch, d_vocab] (with the pair's ``answer`` and
``wrong`` ids and the clean run's last-position logits) to one value per pair. Patching
results are reported raw and normalised, ``(m - m_corrupted) / (m_clean - m_corrupted)``: 0 is
the corrupted run, 1 the clean one (Wang et al. (2022), *Interpretability in the Wild*,
arXiv:2211.00593, sec. 3; Heimersheim and Nanda (2024), arXiv:2404.15255, sec. 3.2 on why the
logit difference is the preferred metric and probability saturates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int

from interp.errors import InterpError

__all__ = ["METRICS", "Metric", "answer_prob", "get_metric", "kl_from_clean", "logit_diff",
           "normalise"]

Metric = Callable[..., torch.Tensor]


def logit_diff(logits: Float[torch.Tensor, "batch d_vocab"], answer: Int[torch.Tensor, " batch"],
               wrong: Int[torch.Tensor, " batch"], clean_logits: torch.Tensor) -> torch.Tensor:
    """logit(answer) - logit(wrong): linear in the final residual, so its gradient is exact
    for the last layer's attribution and it does not saturate like a probability."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, answer] - logits[rows, wrong]


def answer_prob(logits: Float[torch.Tensor, "batch d_vocab"], answer: Int[torch.Tensor, " batch"],
                wrong: Int[torch.Tensor, " batch"], clean_logits: torch.Tensor) -> torch.Tensor:
    """The probability of the answer token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.float().softmax(-1)[rows, answer]


def kl_from_clean(logits: Float[torch.Tensor, "batch d_vocab"],
                  answer: Int[torch.Tensor, " batch"], wrong: Int[torch.Tensor, " batch"],
                  clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_clean || P_patched) in nats over the whole next-token distribution: 0 on the clean
    run, so normalisation maps it to 1 there like the others."""
    p = clean_logits.float().log_softmax(-1)
    q = logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "prob": answer_prob, "kl": kl_from_clean}


def get_metric(metric: str | Metric) -> Metric:
    """A metric by name (``logit_diff``, ``prob``, ``kl``) or the callable itself."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise InterpError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)} or a "
                          "callable (logits, answer, wrong, clean_logits) -> per-pair values.")
    return METRICS[metric]


def normalise(value: float, clean: float, corrupted: float) -> float:
    """0 at the corrupted run's metric, 1 at the clean run's."""
    gap = clean - corrupted
    if abs(gap) < 1e-12:
        raise InterpError(f"The clean and corrupted prompts give the same metric ({clean:.4g}), "
                          "so nothing can be normalised; choose a corruption that changes the "
                          "model's answer.")
    return (value - corrupted) / gap
