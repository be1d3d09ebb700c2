"""Multi-head attention (MHA, GQA, MQA; self- and cross-attention) with its three kernels.

The layer owns one fused q/k/v projection; ``W_Q, W_K, W_V`` [head, d_model, d_head] and ``W_O``
[head, d_head, d_model] are TransformerLens views over that storage (no copy, no cost in the
forward). Positions, masks and score biases come from the forward's
:class:`~interp.components.context.AttnContext`; the layer's run-time switches (``head_gate``,
``use_attn_result``) are listed in :mod:`interp.state`. :class:`LayerKV` holds one layer's keys
and values for incremental decoding.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.components.context import AttnContext
from interp.components.learned_masks import AdaptiveSpan, HardConcreteGates, SelectiveAttention
from interp.components.memory import AttentionMemory, add_memory_hooks, has_memory
from interp.components.norms import RMSNorm
from interp.config import ModelConfig
from interp.errors import InterpError
from interp.hooks import hp, is_hooked, is_reached
from interp.perf.kernels import Linear
from interp.positions import apply_rope
from interp.state import StackLayer


class LayerKV:
    """Keys and values of one layer for incremental decoding, [batch, pos, kv_head, d_head]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head attention with MHA / GQA / MQA, three kernels, and every TL hook.

    ::

        MHA  q: h h h h   GQA  q: h h h h   MQA  q: h h h h
             k: h h h h        k:  h   h         k:    h
             v: h h h h        v:  h   h         v:    h

    ``eager`` builds ``hook_attn_scores`` [batch, head, q, k] and ``hook_pattern``; ``sdpa`` calls
    ``scaled_dot_product_attention`` (O(N) memory); ``auto`` runs eager only while something is
    hooked on this layer's scores or pattern; ``linear`` is kernelised linear attention
    (Katharopoulos et al. 2020) with its feature maps hooked (``hook_q_feat``, ``hook_k_feat``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        stack: str,
        layer: int,
        cross: bool = False,
        use_rope: bool | None = None,
    ):
        super().__init__()
        self.cfg, self.stack, self.layer, self.cross = cfg, stack, layer, cross
        self.head_gate: torch.Tensor | None = None  # [head] multiplier on hook_z (interp.state)
        self.use_attn_result = cfg.use_attn_result  # hook_result in every forward (interp.state)
        nh, nkv, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.n_heads, self.n_kv_heads, self.d_head = nh, nkv, dh
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else dh**-0.5
        self.use_rope = (cfg.positional == "rope" and not cross) if use_rope is None else use_rope
        # a sliding layer runs in its stack context's ``local`` twin: mask & window, local RoPE
        self.sliding = cfg.is_sliding_layer(layer) and not cross
        self.softcap = cfg.attn_softcap  # scores -> cap * tanh(scores / cap), eager only
        if cross:
            self.q_proj = Linear(d, nh * dh, bias=cfg.attn_qkv_bias)
            self.kv_proj = Linear(d, 2 * nkv * dh, bias=cfg.attn_qkv_bias)
        else:
            self.qkv = Linear(d, (nh + 2 * nkv) * dh, bias=cfg.attn_qkv_bias)  # fused q, k, v
        self.o = Linear(nh * dh, d, bias=cfg.attn_out_bias)
        if cfg.qk_norm == "full":
            self.q_norm = RMSNorm(nh * dh, cfg.norm_eps)
            self.k_norm = RMSNorm(nkv * dh, cfg.norm_eps)
        elif cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(dh, cfg.norm_eps), RMSNorm(dh, cfg.norm_eps)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        if self.use_rope:
            self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head]
            self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        if cfg.attn_kernel == "linear":
            self.hook_q_feat = HookPoint()  # [batch, pos, head, d_head]  phi(q)
            self.hook_k_feat = HookPoint()  # [batch, pos, head, d_head]  phi(k)
        if self.softcap is not None:
            self.hook_attn_scores_precap = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model] (opt-in)
        self._init_learned_masks(cfg, cross)
        # memory-augmented attention (interp.components.memory), self-attention layers only
        self.memory = AttentionMemory(cfg, nh, nkv, dh) if has_memory(cfg, layer, cross) else None
        if self.memory is not None:
            add_memory_hooks(self, cfg.memory_kind, gate=not cfg.memory_joint)

    def _init_learned_masks(self, cfg: ModelConfig, cross: bool) -> None:
        """Adaptive span, hard-concrete gates, selective attention (interp.components.
        learned_masks); self-attention only, each with its hook."""
        on = not cross
        self.span = AdaptiveSpan(self.n_heads, cfg.n_ctx, cfg.span_ramp) if (
            on and cfg.adaptive_span) else None
        self.gates = HardConcreteGates(self.n_heads) if on and cfg.l0_head_gates else None
        self.selective = SelectiveAttention() if on and cfg.selective_attention else None
        if self.span is not None:
            self.hook_span_mask = HookPoint()  # [head, q_pos, k_pos]
        if self.gates is not None:
            self.hook_head_gates = HookPoint()  # [head]
        if self.selective is not None:
            self.hook_selection = HookPoint()  # [batch, q_pos, k_pos]
        # these edit the scores, which only the eager kernel forms
        self._edits_scores = self.span is not None or self.selective is not None

    def _span_bias(self, ctx: AttnContext, k_len: int, dtype: torch.dtype) -> torch.Tensor:
        """log of the span mask, [head, q, k], through ``hook_span_mask``."""
        mask = hp(self.hook_span_mask, self.span.mask(ctx.q_pos, k_len))
        return AdaptiveSpan.bias(mask, dtype)

    @property
    def where(self) -> StackLayer:
        """This module's (stack, layer), the key of its gate in ``model.head_gates``."""
        return StackLayer(self.stack, self.layer)

    # ---- TransformerLens per-head views over the fused storage (no copies) ----
    def _rows(self, weight_or_bias: torch.Tensor, part: str) -> torch.Tensor:
        """The rows of the fused projection's weight (or bias) that belong to q, k or v."""
        nh, nkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        if self.cross:
            if part == "q":
                return weight_or_bias
            return weight_or_bias[: nkv * dh] if part == "k" else weight_or_bias[nkv * dh :]
        start = {"q": 0, "k": nh * dh, "v": (nh + nkv) * dh}[part]
        return weight_or_bias[start : start + (nh if part == "q" else nkv) * dh]

    def _w(self, part: str) -> torch.Tensor:
        if self.cross:
            w = self._rows(self.q_proj.weight if part == "q" else self.kv_proj.weight, part)
        else:
            w = self._rows(self.qkv.weight, part)
        pattern = "(head d_head) d_model -> head d_model d_head"
        return einops.rearrange(w, pattern, d_head=self.d_head)

    def _b(self, part: str) -> torch.Tensor:
        n = self.n_heads if part == "q" else self.n_kv_heads
        if self.cross:
            b = self.q_proj.bias if part == "q" else self.kv_proj.bias
        else:
            b = self.qkv.bias
        if b is None:
            w = self.o.weight
            return torch.zeros(n, self.d_head, device=w.device, dtype=w.dtype)
        return self._rows(b, part).view(n, self.d_head)

    @property
    def W_Q(self) -> Float[torch.Tensor, "head d_model d_head"]:
        return self._w("q")

    @property
    def W_K(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return self._w("k")

    @property
    def W_V(self) -> Float[torch.Tensor, "kv_head d_model d_head"]:
        return self._w("v")

    @property
    def W_O(self) -> Float[torch.Tensor, "head d_head d_model"]:
        return einops.rearrange(
            self.o.weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads
        )

    @property
    def b_Q(self) -> Float[torch.Tensor, "head d_head"]:
        return self._b("q")

    @property
    def b_K(self) -> Float[torch.Tensor, "kv_head d_head"]:
        return self._b("k")

    @property
    def b_V(self) -> Float[torch.Tensor, "kv_head d_head"]:
        return self._b("v")

    @property
    def b_O(self) -> Float[torch.Tensor, " d_model"]:
        if self.o.bias is None:
            w = self.o.weight
            return torch.zeros(self.o.out_features, device=w.device, dtype=w.dtype)
        return self.o.bias

    def forward(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        ctx: AttnContext,
        *,
        kv_input: Float[torch.Tensor, "batch kv_pos d_model"] | None = None,
        past: LayerKV | None = None,
        kv_per_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """x [batch, pos, d_model] -> [batch, pos, d_model]; ``kv_input`` is the encoder output
        of cross-attention, ``past`` the layer's cache during incremental decoding.

        TransformerLens' split inputs: ``x`` [batch, pos, head, d_model] holds one (normed)
        copy per query head and ``kv_per_head`` the key and value inputs [batch, pos, kv_head,
        d_model]; head h's copy meets only head h's rows of W_Q (W_K, W_V per KV head)."""
        cfg = self.cfg
        B, T = x.shape[:2]
        nh, nkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        if kv_per_head is not None:
            q, k, v = self._per_head("q", x), *(self._per_head(p, t) for p, t in zip(
                "kv", kv_per_head, strict=True))
        elif self.cross:
            q = self.q_proj(x)
            kv = self.kv_proj(kv_input)
            k, v = kv.narrow(-1, 0, nkv * dh), kv.narrow(-1, nkv * dh, nkv * dh)
        else:
            # narrow, not split: a split's outputs refuse in-place edits under autograd, and
            # TL code edits hook_q/k/v in place (value[:, :, head] = 0)
            qkv = self.qkv(x)
            q, k, v = (qkv.narrow(-1, s, n) for s, n in self._qkv_slices())
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        S_new = k.shape[1]
        q = q.view(B, T, nh, dh)
        k = k.view(B, S_new, nkv, dh)
        v = v.view(B, S_new, nkv, dh)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = hp(self.hook_q, q), hp(self.hook_k, k), hp(self.hook_v, v)
        if self.sliding:
            ctx = ctx.local
        q_content, k_content = q, k  # memory matches content only (Wu et al. 2022)
        if self.use_rope:
            cos, sin = ctx.rope
            q = hp(self.hook_rot_q, apply_rope(q, cos, sin, cfg.rope_interleaved))
            k = hp(self.hook_rot_k, apply_rope(k, cos, sin, cfg.rope_interleaved))
        if past is not None:
            if self.memory is not None and self.memory.kind != "persistent":
                raise InterpError(f"memory_kind={cfg.memory_kind!r} writes each forward to "
                                  "its memory; generate with use_past_kv_cache=False.")
            k, v = past.append(k, v)

        if self.memory is not None:
            z = self.memory.attend(self, q, k, v, ctx, x, q_content, k_content)
        elif cfg.attn_kernel == "linear":
            z = self._linear(q, k, v, ctx)
        elif (cfg.attn_kernel == "eager" or self._edits_scores
              or is_reached(self.hook_attn_scores) or is_reached(self.hook_pattern)):
            z = self._eager(q, k, v, ctx)
        else:
            z = self._sdpa(q, k, v, ctx)
        z = hp(self.hook_z, z)  # [batch, pos, head, d_head]
        if self.gates is not None:  # hard-concrete gates (Voita et al. 2019)
            z = z * hp(self.hook_head_gates, self.gates()).to(z.dtype)[None, None, :, None]
        if self.head_gate is not None:
            z = z * self.head_gate.to(z.dtype)[None, None, :, None]
        if self.use_attn_result or is_hooked(self.hook_result):
            result = hp(self.hook_result, torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return self.o(z.reshape(B, T, nh * dh))

    def _qkv_slices(self) -> tuple[tuple[int, int], ...]:
        """(start, width) of q, k and v in the fused projection's output."""
        nq, nkv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return (0, nq), (nq, nkv), (nq + nkv, nkv)

    def _per_head(
        self, part: str, x: Float[torch.Tensor, "batch pos head d_model"]
    ) -> Float[torch.Tensor, "batch pos head_x_d_head"]:
        """q, k or v of per-head input copies, flat as the fused projection returns them."""
        out = torch.einsum("bphm,hmd->bphd", x, self._w(part)) + self._b(part)
        return out.flatten(2)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        g = self.n_heads // self.n_kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=2)

    def _eager(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        """Materialised scores and pattern, [batch, head, q, k], through their hooks."""
        B, T, nh, dh = q.shape
        nkv, S = k.shape[2], k.shape[1]
        g = nh // nkv
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [batch, kv_head, k, d_head]
        # GQA/MQA without copying K and V once per query head: the g query heads sharing a KV
        # head are stacked along the query axis, one matmul per KV head, and the result viewed
        # back as [batch, head, q, k] (head = kv_head * g + j, the order of repeat_interleave).
        if g == 1:
            qh = q.transpose(1, 2)
        else:
            qh = einops.rearrange(q, "b t (kv g) d -> b kv (g t) d", g=g)
        hard = ctx.hard()
        if (
            hard is not None
            and self.softcap is None
            and hard.shape[0] == 1
            and ctx.pos_bias is None
            and ctx.temperature == 1.0
            and ctx.penalty is None
            and self.selective is None
        ):
            # The common case (a structural mask, no padding, bias, penalty or temperature): scale
            # and mask in the matmul's own epilogue, scores = min-or-0 + scale * q.k^T (baddbmm),
            # one pass over the [batch, head, q, k] buffer instead of three. Masked entries equal
            # finfo.min exactly, as masked_fill would write.
            bias = ctx.hard_bias(q.dtype, rows=g).reshape(g * T, S)  # batch-free, [g * q, k]
            if self.span is not None:  # per head: [kv_head, g * q, k], tiled over the batch
                span = self._span_bias(ctx, S, q.dtype).reshape(nkv, g * T, S)
                bias = (bias + span).clamp(min=torch.finfo(q.dtype).min).repeat(B, 1, 1)
            q3, k3 = qh.reshape(B * nkv, g * T, dh), kh.reshape(B * nkv, S, dh)
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=self.scale)
            return self._softmax_pv(scores.view(B, nh, T, S), vh, q.dtype, g)
        # One [batch, head, q, k] buffer, edited in place (none of these ops' backward needs the
        # overwritten values): with every hook cached each extra copy is fresh memory to fault in.
        scores = (qh @ kh.transpose(-1, -2)).mul_(self.scale).view(B, nh, T, S)
        if self.softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before any bias or mask
            scores = hp(self.hook_attn_scores_precap, scores)
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if ctx.pos_bias is not None:
            scores = scores.add_(ctx.pos_bias.to(scores.dtype))
        selection = None
        if self.selective is not None:  # from head 0's scores (Leviathan et al. 2024)
            if T != S:
                raise InterpError("selective_attention needs the whole sequence in one forward "
                                  "(no KV cache); generate with use_past_kv_cache=False.")
            selection = hp(self.hook_selection, self.selective(scores[:, 0].clone(), ctx.q_pos,
                                                               ctx.hard()))
        if ctx.temperature != 1.0:
            scores = scores.div_(ctx.temperature)
        soft = ctx.soft(scores.dtype)
        if soft is not None:
            scores = scores.add_(soft)
        if self.span is not None:
            scores = scores + self._span_bias(ctx, S, scores.dtype)[None]
        if selection is not None:
            scores = scores - selection[:, None].to(scores.dtype)
        if hard is not None:
            scores = scores.masked_fill_(~hard, torch.finfo(scores.dtype).min)
        if self.span is not None or selection is not None:
            scores = scores.clamp(min=torch.finfo(scores.dtype).min)
        return self._softmax_pv(scores, vh, q.dtype, g)

    def _softmax_pv(
        self, scores: torch.Tensor, vh: torch.Tensor, dtype: torch.dtype, g: int
    ) -> torch.Tensor:
        """scores [batch, head, q, k] -> z [batch, pos, head, d_head] (``g`` query heads per KV
        head, as stacked by :meth:`_eager`)."""
        B, nh, T, S = scores.shape
        nkv, dh = vh.shape[1], vh.shape[-1]
        scores = hp(self.hook_attn_scores, scores)
        pattern = torch.softmax(scores.float(), dim=-1).to(dtype)
        pattern = hp(self.hook_pattern, pattern)  # [batch, head, q, k]
        if g == 1:
            return (pattern @ vh).transpose(1, 2)  # [batch, pos, head, d_head]
        z = pattern.reshape(B, nkv, g * T, S) @ vh  # [batch, kv_head, g * q, d_head]
        return z.view(B, nh, T, dh).transpose(1, 2)

    def _sdpa(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        """PyTorch's fused attention (flash / memory-efficient): no N x N pattern is kept."""
        if self.softcap is not None:  # SDPA cannot bend the scores: the eager path does
            return self._eager(q, k, v, ctx)
        mask, is_causal = ctx.sdpa_mask(q.dtype)
        g = self.n_heads // self.n_kv_heads
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale / ctx.temperature,
            enable_gqa=g > 1,
        )
        return z.transpose(1, 2)

    def _linear(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        """Kernelised linear attention (Katharopoulos et al. 2020); the pattern is built only
        while it is hooked or the queries are not the keys (incremental decoding)."""
        phi = (lambda t: F.elu(t) + 1) if self.cfg.linear_feature_map == "elu" else F.relu
        qf = hp(self.hook_q_feat, phi(q))  # [batch, pos, head, d_head]
        kf = hp(self.hook_k_feat, phi(self._repeat_kv(k)))  # [batch, pos, head, d_head]
        vv = self._repeat_kv(v)
        if ctx.padding is not None:
            kf = kf * ctx.padding[:, :, None, None].to(kf.dtype)
        causal = ctx.mask.is_causal
        eps = 1e-6
        hooked = is_reached(self.hook_attn_scores) or is_reached(self.hook_pattern)
        if hooked or len(ctx.q_pos) != kf.shape[1]:
            scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf)
            if causal:
                scores = scores.masked_fill(~ctx.structural()[None, None], 0.0)
            scores = hp(self.hook_attn_scores, scores)
            pattern = hp(self.hook_pattern, scores / scores.sum(-1, keepdim=True).clamp(min=eps))
            return torch.einsum("bhqk,bkhd->bqhd", pattern, vv)
        if causal:  # running sums over keys: O(N d^2) time, no N x N matrix
            kv = torch.einsum("bkhd,bkhe->bkhde", kf, vv).cumsum(dim=1)
            num = torch.einsum("bqhd,bqhde->bqhe", qf, kv)
            den = torch.einsum("bqhd,bqhd->bqh", qf, kf.cumsum(dim=1))
        else:
            kv = torch.einsum("bkhd,bkhe->bhde", kf, vv)
            num = torch.einsum("bqhd,bhde->bqhe", qf, kv)
            den = torch.einsum("bqhd,bhd->bqh", qf, kf.sum(dim=1))
        return num / den.clamp(min=eps)[..., None]
