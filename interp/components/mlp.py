"""The dense feed-forward layer and the FFN activation registry.

Gated variants (SwiGLU, GeGLU, ReGLU; Shazeer 2020) fuse gate and up projections in one matmul;
``W_in`` / ``W_gate`` / ``W_out`` are TransformerLens-style views over that storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.config import ModelConfig
from interp.hooks import hp
from interp.perf.kernels import Linear

#: FFN activations; gated ones map to the activation applied to the gate (Shazeer 2020).
ACT_FNS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "reglu": F.relu,
}


class MLP(nn.Module):
    """Dense FFN; gated variants (SwiGLU, GeGLU) fuse gate and up projections in one matmul.

    Hooks as TransformerLens: ``hook_pre`` (the gate pre-activation for gated FFNs),
    ``hook_pre_linear`` (the up projection, gated only), ``hook_post`` [batch, pos, d_mlp].
    """

    def __init__(self, cfg: ModelConfig, d_mlp: int | None = None):
        super().__init__()
        self.d_mlp = d_mlp or cfg.d_mlp
        self.gated = cfg.is_gated
        self.act = ACT_FNS[cfg.act]
        width = self.d_mlp * (2 if self.gated else 1)
        self.fc_in = Linear(cfg.d_model, width, bias=cfg.mlp_bias)  # [gate; up]
        self.fc_out = Linear(self.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_in(self) -> Float[torch.Tensor, "d_model d_mlp"]:
        """The input projection (the up projection for gated FFNs)."""
        return self.fc_in.weight[-self.d_mlp :].T

    @property
    def W_gate(self) -> Float[torch.Tensor, "d_model d_mlp"] | None:
        """The gate projection of a gated FFN, else None."""
        return self.fc_in.weight[: self.d_mlp].T if self.gated else None

    @property
    def W_out(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        return self.fc_out.weight.T

    @property
    def b_in(self) -> Float[torch.Tensor, " d_mlp"]:
        w = self.fc_in.weight
        if self.fc_in.bias is None:
            return torch.zeros(self.d_mlp, device=w.device, dtype=w.dtype)
        return self.fc_in.bias[-self.d_mlp :]

    @property
    def b_out(self) -> Float[torch.Tensor, " d_model"]:
        w = self.fc_out.weight
        if self.fc_out.bias is None:
            return torch.zeros(self.fc_out.out_features, device=w.device, dtype=w.dtype)
        return self.fc_out.bias

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.split(self.d_mlp, dim=-1)
            act = self.act(hp(self.hook_pre, gate))
            up = hp(self.hook_pre_linear, up)
            # the activation's output is a fresh tensor no hook sees: without autograd, gate it
            # in place (one [batch, pos, d_mlp] allocation fewer per layer)
            post = act * up if torch.is_grad_enabled() else act.mul_(up)
        else:
            post = self.act(hp(self.hook_pre, h))
        return self.fc_out(hp(self.hook_post, post))
