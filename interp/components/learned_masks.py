"""Learned attention masks: adaptive span, hard-concrete head gates, selective attention.

Three masks whose values are learned rather than fixed by the config, each one flag of
:class:`interp.config.ModelConfig` and each read through a hook on the attention layer:

==================== ========================================= ===============================
flag                 what is learned                           hook (on ``blocks.{l}.attn``)
==================== ========================================= ===============================
``adaptive_span``    a span z per head; key at distance x is   ``hook_span_mask`` [head, q, k]
                     weighted by m_z(x) = clamp((R + z - x) /
                     R, 0, 1) (Sukhbaatar et al. 2019)
``l0_head_gates``    a hard-concrete gate per head on its      ``hook_head_gates`` [head]
                     output z (Louizos et al. 2018; Voita et
                     al. 2019): sampled in training,
                     deterministic at eval
``selective_attention`` nothing new: head 0's scores decide     ``hook_selection`` [batch, q, k]
                     which earlier tokens later queries stop
                     seeing (Leviathan et al. 2024)
==================== ========================================= ===============================

The span enters the scores as the additive bias ``log m`` (the paper's ``m * exp(s)``
renormalised is exactly ``softmax(s + log m)``), so it is a soft mask applied before
``hook_attn_scores`` like every other. A span covering the whole context has ``m = 1``, bias 0,
and the layer is plain attention bit for bit; gates at 1 multiply by 1.0. The penalties the
papers train with are :func:`span_penalty` (L1 on spans) and :func:`l0_penalty` (expected
number of open gates).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

__all__ = [
    "LEARNED_MASK_INIT",
    "AdaptiveSpan",
    "HardConcreteGates",
    "SelectiveAttention",
    "l0_penalty",
    "span_penalty",
]

#: hard-concrete stretch and temperature (Louizos et al. 2018, section 4; Voita et al. 2019)
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
#: initial value of each learned-mask parameter (by its name; the model's init_weights reads it):
#: a span covering the whole context, gates whose evaluation value is exactly 1
LEARNED_MASK_INIT = {"span_frac": 1.0, "log_alpha": 3.0}


class AdaptiveSpan(nn.Module):
    """One learned span per head (Sukhbaatar et al. 2019, "Adaptive Attention Span").

    ``span_frac`` [head] in [0, 1] is the parameter (z = span_frac * max_span): a fraction, so
    an optimiser step moves every span by the same share of the context whatever its length.
    It starts at 1, a span covering the whole context (the layer is then plain attention).
    """

    def __init__(self, n_heads: int, max_span: int, ramp: int):
        super().__init__()
        self.max_span, self.ramp = max_span, ramp
        # [head]
        self.span_frac = nn.Parameter(torch.full((n_heads,), LEARNED_MASK_INIT["span_frac"]))

    @property
    def spans(self) -> Float[torch.Tensor, " head"]:
        """z per head, in positions (keys further back than z + ramp are never seen)."""
        return self.span_frac.clamp(0.0, 1.0) * self.max_span

    def mask(self, q_pos: torch.Tensor, k_len: int) -> Float[torch.Tensor, "head q_pos k_pos"]:
        """m_z(q - k) = clamp((R + z - (q - k)) / R, 0, 1) for every head, query and key."""
        k = torch.arange(k_len, device=q_pos.device)
        dist = (q_pos[:, None] - k[None, :]).to(self.span_frac.dtype)  # [q, k]
        z = self.spans[:, None, None]
        return ((self.ramp + z - dist[None]) / self.ramp).clamp(0.0, 1.0)

    @staticmethod
    def bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``log m`` as an additive score bias; ``finfo.min`` (not -inf) where m = 0, and a
        finite gradient everywhere (log of 0 would give inf * 0 = nan)."""
        lo = torch.finfo(dtype).min
        logm = torch.log(mask.clamp(min=1e-30)).to(dtype)
        return torch.where(mask > 0, logm, torch.full_like(logm, lo))


class HardConcreteGates(nn.Module):
    """A hard-concrete gate per head (Louizos et al. 2018), as Voita et al. (2019) prune heads.

    Training draws ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, u ~ U(0, 1), one
    draw per head per forward; evaluation uses ``s = sigmoid(log_alpha)``. Either is stretched
    to (gamma, zeta) and clipped to [0, 1], so a gate can be exactly 0 (head pruned) or exactly
    1. ``log_alpha`` starts at 3, where the evaluation gate is exactly 1.
    """

    def __init__(self, n_heads: int, init_log_alpha: float = LEARNED_MASK_INIT["log_alpha"]):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n_heads,), float(init_log_alpha)))  # [head]

    def forward(self) -> Float[torch.Tensor, " head"]:
        la = self.log_alpha
        if self.training:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
        else:
            s = torch.sigmoid(la)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> Float[torch.Tensor, " head"]:
        """P(gate != 0) per head: the differentiable L0 norm of Louizos et al. (eq. 12)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


class SelectiveAttention(nn.Module):
    """Content-dependent masking from head 0's scores (Leviathan et al. 2024, section 3).

    Token i' "selects" (hides) an earlier token j by ``relu(score_0[i', j])``; the hidden
    amounts accumulate, so query i subtracts ``F[i, j] = sum_{j < i' < i} relu(score_0[i', j])``
    from every head's score on key j. The first token is never hidden, nor a token by itself.
    There are no parameters: what is learned is head 0's q and k.
    """

    def forward(
        self,
        scores0: Float[torch.Tensor, "batch q_pos k_pos"],
        q_pos: torch.Tensor,
        hard: torch.Tensor | None,
    ) -> Float[torch.Tensor, "batch q_pos k_pos"]:
        """The accumulated selection F [batch, q, k] (subtracted from the scores)."""
        k = torch.arange(scores0.shape[-1], device=scores0.device)
        earlier = (k[None, :] < q_pos[:, None]) & (k[None, :] > 0)  # [q, k]
        sel = F.relu(scores0) * earlier.to(scores0.dtype)
        if hard is not None:  # padded keys select and are selected by nothing
            sel = sel * hard[:, 0].to(sel.dtype)
        acc = sel.cumsum(dim=-2)  # [batch, q, k]: selections by queries <= i
        return torch.cat([torch.zeros_like(acc[:, :1]), acc[:, :-1]], dim=-2)  # queries < i


def span_penalty(model: nn.Module) -> torch.Tensor:
    """Sum over layers and heads of the learned span z, as a fraction of the context (the L1
    span loss of Sukhbaatar et al.); 0 for a model without adaptive spans."""
    terms = [m.span_frac.clamp(0.0, 1.0).sum() for m in model.modules()
             if isinstance(m, AdaptiveSpan)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """Expected number of open gates over all layers (Louizos et al.'s L0 term, as Voita et al.
    train it); 0 for a model without hard-concrete gates."""
    terms = [m.open_probability().sum() for m in model.modules()
             if isinstance(m, HardConcreteGates)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
