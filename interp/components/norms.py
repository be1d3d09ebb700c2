"""Normalisation layers and their registry: LayerNorm, RMSNorm, or none.

Both norms carry TransformerLens' hooks: ``hook_scale`` [batch, pos, 1] (the divisor) and
``hook_normalized`` [batch, pos, d]. While ``hook_scale`` is unhooked they run the fused
PyTorch kernel; a hooked scale makes the output follow whatever the hook returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.config import ModelConfig
from interp.hooks import hp, is_hooked


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens hooks: ``hook_scale`` [batch, pos, 1] (the std),
    ``hook_normalized``."""

    def __init__(self, d: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d)) if bias else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        if not is_hooked(self.hook_scale):
            return hp(self.hook_normalized, F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps))
        # Hooked scale: the output must be computed from whatever the hook returns (freezing LN
        # scales is a common intervention). One Welford pass gives mean and variance, and only
        # two [batch, pos, d] tensors are allocated: caching every hook keeps each allocation
        # alive, so every avoided temporary is memory the kernel would otherwise fault in.
        var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
        scale = hp(self.hook_scale, (var + self.eps).sqrt())
        xc = (x - mean).div_(scale)
        out = torch.addcmul(self.b, xc, self.w) if self.b is not None else xc.mul_(self.w)
        return hp(self.hook_normalized, out)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang and Sennrich 2019) with the same hooks as :class:`LayerNorm`."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        if not is_hooked(self.hook_scale) and x.dtype == torch.float32:
            return hp(self.hook_normalized, F.rms_norm(x, x.shape[-1:], self.w, self.eps))
        x32 = x.float()
        ms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x.shape[-1]
        scale = hp(self.hook_scale, (ms + self.eps).sqrt())
        return hp(self.hook_normalized, (x32 / scale).to(x.dtype).mul_(self.w))


def make_norm(cfg: ModelConfig, d: int | None = None) -> nn.Module | None:
    """The norm registry: layernorm, rmsnorm, or none (no module)."""
    d = d or cfg.d_model
    if cfg.norm == "layernorm":
        return LayerNorm(d, cfg.norm_eps, bias=cfg.norm_bias)
    if cfg.norm == "rmsnorm":
        return RMSNorm(d, cfg.norm_eps)
    return None


def apply_norm(mod: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``, or ``x`` itself where the config has no norm."""
    return x if mod is None else mod(x)
