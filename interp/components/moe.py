"""The mixture-of-experts FFN: a top-k router over dense experts, with its auxiliary losses.

Experts run batched by expert (each sees only its routed tokens), so per-expert hooks are
[tokens_routed_to_e, d_mlp]; ``expert_mask`` is the run-time switch that removes experts
(set through ``model.set_expert_mask``; see :mod:`interp.state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.components.mlp import MLP
from interp.config import ModelConfig
from interp.hooks import hp
from interp.perf.kernels import Linear


class MoE(nn.Module):
    """Top-k mixture of experts (Shazeer et al. 2017; Fedus et al. 2021; Jiang et al. 2024).

    Router: ``softmax_topk`` (softmax over all experts, keep the top k, optionally renormalise:
    Mixtral, OLMoE, Qwen2-MoE) or ``topk_softmax`` (softmax over the top-k logits). Experts run
    batched by expert: each sees only its routed tokens, and its hooks ``experts.{e}.hook_pre``
    / ``hook_post`` are [tokens_routed_to_e, d_mlp]. Shared experts (Qwen2-MoE, DeepSeekMoE) see
    every token. ``expert_mask`` (bool [expert]) removes experts at run time; the router
    renormalises over the rest. After each forward ``last_losses`` holds the Switch
    load-balancing loss ``N * sum_i f_i P_i`` and the router z-loss
    ``mean(logsumexp(logits)^2)`` (unweighted).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.k = cfg.n_experts, cfg.experts_per_token
        self.router = Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList([MLP(cfg, cfg.d_expert) for _ in range(cfg.n_experts)])
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, cfg.d_shared_expert * cfg.n_shared_experts)
            if cfg.shared_expert_gate:
                self.shared_gate = Linear(cfg.d_model, 1, bias=False)
        self.expert_mask: Bool[torch.Tensor, " expert"] | None = None
        self.last_losses: dict[str, torch.Tensor] = {}
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        token_mask: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        B, T, D = x.shape
        logits = hp(self.hook_router_logits, self.router(x))  # [batch, pos, expert]
        lf = logits.float()
        if self.expert_mask is not None:
            lf = lf.masked_fill(~self.expert_mask.to(lf.device), float("-inf"))
        probs = torch.softmax(lf, dim=-1)
        if self.cfg.router == "softmax_topk":
            w, idx = probs.topk(self.k, dim=-1)
            if self.cfg.router_renormalize:
                w = w / w.sum(-1, keepdim=True)
        else:
            top, idx = lf.topk(self.k, dim=-1)
            w = torch.softmax(top, dim=-1)
        w = hp(self.hook_expert_weights, w.to(x.dtype))  # [batch, pos, top_k]
        idx = hp(self.hook_expert_indices, idx)  # [batch, pos, top_k]

        flat = x.reshape(-1, D)
        flat_idx, flat_w = idx.reshape(-1, self.k), w.reshape(-1, self.k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (flat_idx == e).nonzero(as_tuple=True)
            y = expert(flat[tok]) * flat_w[tok, slot, None]
            out.index_add_(0, tok, y)
        out = out.view(B, T, D)
        if hasattr(self, "shared"):
            s = self.shared(x)
            if hasattr(self, "shared_gate"):
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        self._losses(lf, probs, idx, token_mask)
        return out

    def _losses(
        self,
        lf: torch.Tensor,
        probs: torch.Tensor,
        idx: torch.Tensor,
        token_mask: torch.Tensor | None,
    ) -> None:
        """Switch load balancing (Fedus et al. 2021, eq. 4) and ST-MoE z-loss (Zoph et al.
        2022), over the tokens ``token_mask`` keeps (padding excluded)."""
        E = self.n_experts
        keep = None if token_mask is None else token_mask.reshape(-1).bool()
        p = probs.reshape(-1, E)
        counts = F.one_hot(idx.reshape(-1, self.k), E).sum(1).float()  # [tokens, expert]
        finite = torch.where(torch.isfinite(lf), lf, torch.zeros_like(lf)).reshape(-1, E)
        lse = torch.logsumexp(lf.reshape(-1, E), dim=-1)
        lse = torch.where(torch.isfinite(lse), lse, finite.logsumexp(-1))
        if keep is not None:
            p, counts, lse = p[keep], counts[keep], lse[keep]
        n = max(p.shape[0], 1)
        f = counts.sum(0) / (n * self.k)
        P = p.sum(0) / n
        z = (lse**2).mean() if lse.numel() else lse.sum()
        self.last_losses = {"aux": E * (f * P).sum(), "z": z}
