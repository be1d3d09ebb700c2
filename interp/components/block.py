"""The residual block: attention, optional cross-attention, and the FFN (dense or MoE).

::

    pre-norm:  x + attn(ln1 x) -> resid_mid;  resid_mid + mlp(ln2 resid_mid) -> resid_post
    post-norm: ln1(x + attn x) -> resid_mid;  ln2(resid_mid + mlp resid_mid) -> resid_post
    parallel:  x + attn(ln1 x) + mlp(ln2 x) -> resid_post            (GPT-J / NeoX)
    sandwich:  x + ln1_post(attn(ln1 x)) -> resid_mid; ... + ln2_post(mlp(ln2 .))  (Gemma 2/3)
    post_branch: x + ln1_post(attn x) -> resid_mid; ... + ln2_post(mlp .)          (OLMo 2)
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.components.attention import Attention, LayerKV
from interp.components.context import AttnContext
from interp.components.mlp import MLP
from interp.components.moe import MoE
from interp.components.norms import apply_norm, make_norm
from interp.config import ModelConfig
from interp.hooks import hp


class Block(nn.Module):
    """One residual block; pre-norm, post-norm or parallel, optional cross-attention (see the
    module docstring for the three residual layouts)."""

    def __init__(
        self, cfg: ModelConfig, *, stack: str, layer: int, cross: bool = False, moe: bool = False
    ):
        super().__init__()
        self.cfg, self.layer, self.has_cross = cfg, layer, cross
        branch = cfg.norm_placement in ("sandwich", "post_branch")
        self.ln1 = None if cfg.norm_placement == "post_branch" else make_norm(cfg)
        if branch:  # the norm inside the residual branch, after the sub-layer (TL's names)
            self.ln1_post = make_norm(cfg)
        self.attn = Attention(cfg, stack=stack, layer=layer)
        if cross:
            self.ln_cross = make_norm(cfg)
            self.cross_attn = Attention(cfg, stack=stack + ".cross", layer=layer, cross=True)
            self.hook_cross_attn_out = HookPoint()  # [batch, pos, d_model]
            self.hook_resid_mid_cross = HookPoint()  # [batch, pos, d_model]
        if not cfg.attn_only:
            self.ln2 = None if cfg.norm_placement == "post_branch" else make_norm(cfg)
            self.mlp = MoE(cfg) if moe else MLP(cfg)
            if branch:
                self.ln2_post = make_norm(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        if not (cfg.attn_only or cfg.parallel_attn_mlp):
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        if not cfg.attn_only:
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def _mlp(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        out = self.mlp(x, token_mask) if isinstance(self.mlp, MoE) else self.mlp(x)
        if hasattr(self, "ln2_post"):  # sandwich / post-branch: the norm inside the branch
            out = self.ln2_post(out)
        return out

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        ctx: AttnContext,
        *,
        past: LayerKV | None = None,
        enc: Float[torch.Tensor, "batch enc_pos d_model"] | None = None,
        cross_ctx: AttnContext | None = None,
        token_mask: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The block's output residual; ``token_mask`` (padding) only feeds MoE losses."""
        cfg = self.cfg
        x = hp(self.hook_resid_pre, x)
        if cfg.parallel_attn_mlp:
            a = hp(self.hook_attn_out, self.attn(apply_norm(self.ln1, x), ctx, past=past))
            m = hp(self.hook_mlp_out, self._mlp(apply_norm(self.ln2, x), token_mask))
            return hp(self.hook_resid_post, x + a + m)
        post = cfg.norm_placement == "post"
        a_in = x if post else apply_norm(self.ln1, x)
        a = self.attn(a_in, ctx, past=past)
        if hasattr(self, "ln1_post"):
            a = self.ln1_post(a)
        a = hp(self.hook_attn_out, a)
        x = apply_norm(self.ln1, x + a) if post else x + a
        if cfg.attn_only:
            return hp(self.hook_resid_post, x)
        x = hp(self.hook_resid_mid, x)
        if self.has_cross:
            c_in = x if post else apply_norm(self.ln_cross, x)
            c = hp(self.hook_cross_attn_out, self.cross_attn(c_in, cross_ctx, kv_input=enc))
            x = apply_norm(self.ln_cross, x + c) if post else x + c
            x = hp(self.hook_resid_mid_cross, x)
        m = hp(self.hook_mlp_out, self._mlp(x if post else apply_norm(self.ln2, x), token_mask))
        x = apply_norm(self.ln2, x + m) if post else x + m
        return hp(self.hook_resid_post, x)
