"""Normalisation layers and their registry: LayerNorm, RMSNorm, or none.

Both norms carry TransformerLens' hooks with TransformerLens' meaning:

- ``hook_scale`` [batch, pos, 1]: the divisor (LayerNorm: sqrt(var + eps); RMSNorm:
  sqrt(mean(x^2) + eps));
- ``hook_normalized`` [batch, pos, d]: ``x / scale`` (centred first for LayerNorm), *before*
  the norm's weight and bias. The norm's output is ``hook_normalized * w + b``, so editing
  ``hook_normalized`` changes the output, and a cache of it equals TransformerLens' (and what
  ``ActivationCache.apply_ln_to_stack`` computes from ``hook_scale``).

While neither hook is hooked they run the fused PyTorch kernel. After weight processing
(:mod:`interp.processing`, ``fold_ln``) a norm's weight and bias are folded into the layers
that read it and removed from the module (``"w" not in norm._parameters``): the norm is then
TransformerLens' ``LNPre`` / ``RMSPre``, whose output is ``hook_normalized`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.config import ModelConfig
from interp.hooks import hp, is_hooked


class _Norm(nn.Module):
    """What both norms share: the two hooks and the optional (foldable) weight and bias."""

    w: nn.Parameter
    eps: float

    @property
    def weight_or_none(self) -> torch.Tensor | None:
        """The gain, or None once folded away (TransformerLens' LNPre / RMSPre)."""
        return self._parameters.get("w")

    @property
    def bias_or_none(self) -> torch.Tensor | None:
        """The bias, or None (RMSNorm, a bias-free LayerNorm, or folded away)."""
        return self._parameters.get("b")

    @property
    def is_folded(self) -> bool:
        """True after ``fold_ln``: the norm only centres (LayerNorm) and divides by its scale."""
        return "w" not in self._parameters

    def remove_affine(self) -> None:
        """Drop the weight and bias (their effect must already live in the readers' weights):
        the module becomes TransformerLens' LNPre / RMSPre, and ``hasattr(norm, "w")`` is False
        so code that multiplies by a gain where one exists stays correct."""
        for name in ("w", "b"):
            if name in self._parameters:
                delattr(self, name)

    def _affine(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed * w + b`` (each where present), never in place: ``normed`` may be cached."""
        w, b = self.weight_or_none, self.bias_or_none
        if w is not None and b is not None:
            return torch.addcmul(b, normed, w)
        if w is not None:
            normed = normed * w
        return normed if b is None else normed + b

    def _hooked(self) -> bool:
        return is_hooked(self.hook_scale) or is_hooked(self.hook_normalized)


class LayerNorm(_Norm):
    """LayerNorm with TransformerLens hooks: ``hook_scale`` [batch, pos, 1] (the std),
    ``hook_normalized`` (centred and divided by the scale, before weight and bias)."""

    def __init__(self, d: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d)) if bias else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        if not self._hooked():
            return F.layer_norm(x, x.shape[-1:], self.weight_or_none, self.bias_or_none, self.eps)
        # Hooked: the output is computed from whatever the hooks return (freezing LN scales or
        # patching the normalised stream are common interventions). One Welford pass gives mean
        # and variance.
        var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
        scale = hp(self.hook_scale, (var + self.eps).sqrt())
        normed = hp(self.hook_normalized, (x - mean).div_(scale))
        return self._affine(normed)


class RMSNorm(_Norm):
    """RMSNorm (Zhang and Sennrich 2019) with the same hooks as :class:`LayerNorm`
    (``hook_normalized`` = x / rms, before the gain)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        if not self._hooked() and x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight_or_none, self.eps)
        x32 = x.float()
        ms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x.shape[-1]
        scale = hp(self.hook_scale, (ms + self.eps).sqrt())
        normed = hp(self.hook_normalized, (x32 / scale).to(x.dtype))
        return self._affine(normed)


def make_norm(cfg: ModelConfig, d: int | None = None) -> nn.Module | None:
    """The norm registry: layernorm, rmsnorm, or none (no module). A config whose weights
    were processed with ``fold_ln`` builds the folded form (no weight or bias), so a processed
    model saves and reloads as it is."""
    d = d or cfg.d_model
    norm: _Norm | None = None
    if cfg.norm == "layernorm":
        norm = LayerNorm(d, cfg.norm_eps, bias=cfg.norm_bias)
    elif cfg.norm == "rmsnorm":
        norm = RMSNorm(d, cfg.norm_eps)
    if norm is not None and cfg.layer_norm_folding:
        norm.remove_affine()
    return norm


def apply_norm(mod: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``, or ``x`` itself where the config has no norm."""
    return x if mod is None else mod(x)
