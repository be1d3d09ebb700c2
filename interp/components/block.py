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
from interp.hooks import hp, is_hooked, is_reached


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
        # TransformerLens' opt-in per-head inputs (cfg.use_attn_in, cfg.use_split_qkv_input)
        self.hook_attn_in = HookPoint()  # [batch, pos, head, d_model]
        self.hook_q_input = HookPoint()  # [batch, pos, head, d_model]
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head, d_model]
        if not cfg.attn_only:
            self.hook_mlp_in = HookPoint()  # [batch, pos, d_model] (opt-in: cfg.use_hook_mlp_in)
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
            a = hp(self.hook_attn_out, self._attend(x, ctx, past, self.ln1))
            m = hp(self.hook_mlp_out, self._mlp(apply_norm(self.ln2, self._mlp_in(x)), token_mask))
            return hp(self.hook_resid_post, x + a + m)
        post = cfg.norm_placement == "post"
        a = self._attend(x, ctx, past, None if post else self.ln1)
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
        m_in = self._mlp_in(x)
        m_in = m_in if post else apply_norm(self.ln2, m_in)
        m = hp(self.hook_mlp_out, self._mlp(m_in, token_mask))
        x = apply_norm(self.ln2, x + m) if post else x + m
        return hp(self.hook_resid_post, x)

    def _mlp_in(self, x: Float[torch.Tensor, "batch pos d_model"]) -> torch.Tensor:
        """``hook_mlp_in``: a copy of the residual entering the MLP's norm, so an in-place edit
        reaches the MLP and not the residual (as TransformerLens)."""
        return hp(self.hook_mlp_in, x.clone()) if is_reached(self.hook_mlp_in) else x

    def _attend(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        ctx: AttnContext,
        past: LayerKV | None,
        norm: nn.Module | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Self-attention of the residual ``x`` (``norm`` applied first; None for post-norm).

        With TransformerLens' per-head inputs on (the flags, or a hook registered on one of
        them) the residual is copied once per head: ``hook_attn_in`` [batch, pos, head,
        d_model]; ``hook_q_input`` per query head and ``hook_k_input`` / ``hook_v_input`` per
        KV head (taken from ``hook_attn_in`` when both are on; KV head j reads the copy of
        its group's first query head). The norm is applied to each copy, as TL does."""
        cfg = self.cfg
        hooks = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        use_in = cfg.use_attn_in or is_hooked(self.hook_attn_in)
        split = cfg.use_split_qkv_input or any(is_hooked(h) for h in hooks)
        if not (use_in or split):
            return self.attn(apply_norm(norm, x), ctx, past=past)
        g = cfg.n_heads // cfg.n_kv_heads
        heads = x[:, :, None].repeat(1, 1, cfg.n_heads, 1)  # [batch, pos, head, d_model]
        if use_in:
            heads = hp(self.hook_attn_in, heads)
        kv = heads[:, :, ::g]  # [batch, pos, kv_head, d_model]
        q_in, k_in, v_in = heads, kv, kv
        if split:  # fresh copies: an in-place edit of one input must not reach another
            inputs = zip(hooks, (heads, kv, kv), strict=True)
            q_in, k_in, v_in = (hp(h, t.clone()) for h, t in inputs)
        q_in, k_in, v_in = (apply_norm(norm, t) for t in (q_in, k_in, v_in))
        return self.attn(q_in, ctx, past=past, kv_per_head=(k_in, v_in))
