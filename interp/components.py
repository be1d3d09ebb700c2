"""The model's parts: norms, attention, FFN, mixture of experts, the residual block.

Every activation passes a declared ``HookPoint`` (shapes in comments, TransformerLens dimension
names). :func:`hp` calls a hook point only when something is registered on it, so an unhooked
model pays no per-hook module-call overhead, and a hooked one never skips a registered hook.

Weights live in the layout the fast path wants (one fused q/k/v projection, fused gate/up for
gated FFNs); TransformerLens per-head views (``W_Q`` [head, d_model, d_head], ``W_O`` [head,
d_head, d_model], ``W_in`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model]) are properties over
the same storage: no copy, no cost in the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.config import ModelConfig
from interp.perf.kernels import Linear
from interp.masks import MaskSpec
from interp.positions import apply_rope


def hp(hook: HookPoint, x: Any) -> Any:
    """Pass ``x`` through ``hook`` only if a hook is registered on it (forward or backward)."""
    if hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks:
        return hook(x)
    return x


def is_hooked(hook: HookPoint) -> bool:
    return bool(hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks)


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


# --------------------------------------------------------------------------------------------
# run-time state shared by all layers (mask overrides, head gates, attention results)
# --------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Mutable switches an analysis flips without touching the frozen config."""

    mask: MaskSpec | None = None  # override cfg.mask
    soft_mask_penalty: float | None = None  # override cfg.soft_mask_penalty (use with override_penalty)
    override_penalty: bool = False
    temperature: float | None = None  # override cfg.attn_temperature
    use_attn_result: bool = False  # compute hook_result [batch, pos, head, d_model] (opt-in, as TL)
    head_gates: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (stack, layer) -> [head]


# --------------------------------------------------------------------------------------------
# per-forward attention context: positions, masks and score biases built once, used by all layers
# --------------------------------------------------------------------------------------------
class AttnContext:
    """Positions and masks of one forward pass of one stack.

    ``allowed`` is the structural mask (from a :class:`MaskSpec`), ``padding`` the tokenizer's
    attention mask; a soft penalty replaces -inf on structurally masked keys by a finite
    ``-penalty`` (padding always stays hard). ``pos_bias`` is ALiBi's or T5's [head, q, k] bias.
    """

    def __init__(self, *, q_pos: torch.Tensor, k_len: int, mask: MaskSpec, padding: torch.Tensor | None,
                 penalty: float | None, temperature: float, pos_bias: torch.Tensor | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.q_pos, self.k_len, self.mask, self.padding = q_pos, k_len, mask, padding
        self.penalty, self.temperature, self.pos_bias, self.rope = penalty, temperature, pos_bias, rope
        self._cache: dict[Any, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.q_pos.device

    def structural(self) -> torch.Tensor | None:
        """[q, k] bool (True = visible) or None when everything is visible."""
        if "structural" not in self._cache:
            if self.mask.is_full:
                self._cache["structural"] = None
            else:
                k = torch.arange(self.k_len, device=self.device)
                self._cache["structural"] = self.mask.allowed(self.q_pos[:, None], k[None, :]).expand(len(self.q_pos), self.k_len)
        return self._cache["structural"]

    def hard(self) -> torch.Tensor | None:
        """[batch|1, 1, q, k] bool of keys that may be seen at all (None = all)."""
        if "hard" not in self._cache:
            s = None if self.penalty is not None else self.structural()
            out = None if s is None else s[None, None]
            if self.padding is not None:
                pad = self.padding[:, None, None, :]
                out = pad if out is None else (out & pad)
            self._cache["hard"] = out
        return self._cache["hard"]

    def soft(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[1, 1, q, k] additive -penalty on structurally masked keys, or None."""
        if self.penalty is None:
            return None
        key = ("soft", dtype)
        if key not in self._cache:
            s = self.structural()
            self._cache[key] = None if s is None else torch.where(s, 0.0, -float(self.penalty)).to(dtype)[None, None]
        return self._cache[key]

    def hard_bias(self, dtype: torch.dtype, rows: int = 1) -> torch.Tensor | None:
        """:meth:`hard` as an additive mask (0 visible, ``finfo.min`` hidden), [batch|1, 1, q, k];
        with ``rows > 1`` the single [q, k] mask tiled to [rows * q, k] (for grouped-query
        eager attention, which stacks a KV head's query heads along the query axis)."""
        key = ("hard_bias", dtype, rows)
        if key not in self._cache:
            hard = self.hard()
            if hard is None:
                out = None
            elif rows == 1:
                out = torch.zeros(hard.shape, dtype=dtype, device=self.device).masked_fill_(~hard, torch.finfo(dtype).min)
            else:
                out = self.hard_bias(dtype)[0, 0].repeat(rows, 1)
            self._cache[key] = out
        return self._cache[key]

    def sdpa_mask(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
        """(float additive mask, is_causal) for ``scaled_dot_product_attention``.

        The score bias is divided by the temperature here because SDPA's ``scale`` only scales
        q.k; the mask itself is not (it is -inf-like or a fixed penalty)."""
        key = ("sdpa", dtype)
        if key not in self._cache:
            T = len(self.q_pos)
            plain_causal = (self.mask.is_causal and self.penalty is None and self.padding is None
                            and self.pos_bias is None and T == self.k_len)
            if plain_causal:
                self._cache[key] = (None, True)
            else:
                m = None
                if self.pos_bias is not None:
                    m = (self.pos_bias / self.temperature).to(dtype)[None]
                h = self.hard_bias(dtype)
                if h is not None:
                    m = h if m is None else m + h
                soft = self.soft(dtype)
                if soft is not None:
                    m = soft if m is None else m + soft
                if m is not None:
                    m = m.clamp(min=torch.finfo(dtype).min)
                self._cache[key] = (m, False)
        return self._cache[key]


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens hooks: ``hook_scale`` [batch, pos, 1] (the std), ``hook_normalized``."""

    def __init__(self, d: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d)) if bias else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def _norm(mod: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if mod is None else mod(x)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
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

    def __init__(self, cfg: ModelConfig, *, stack: str, layer: int, cross: bool = False,
                 runtime: Runtime | None = None, use_rope: bool | None = None):
        super().__init__()
        self.cfg, self.stack, self.layer, self.cross = cfg, stack, layer, cross
        self.runtime = runtime if runtime is not None else Runtime()
        nh, nkv, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.n_heads, self.n_kv_heads, self.d_head = nh, nkv, dh
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else dh**-0.5
        self.use_rope = (cfg.positional == "rope" and not cross) if use_rope is None else use_rope
        if cross:
            self.q_proj = Linear(d, nh * dh, bias=cfg.attn_qkv_bias)
            self.kv_proj = Linear(d, 2 * nkv * dh, bias=cfg.attn_qkv_bias)
        else:
            self.qkv = Linear(d, (nh + 2 * nkv) * dh, bias=cfg.attn_qkv_bias)  # fused q, k, v
        self.o = Linear(nh * dh, d, bias=cfg.attn_out_bias)
        if cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(nh * dh, cfg.norm_eps), RMSNorm(nkv * dh, cfg.norm_eps)
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
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model] (opt-in)

    # ---- TransformerLens per-head views over the fused storage (no copies) ----
    def _w(self, part: str) -> torch.Tensor:
        nh, nkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        if self.cross:
            w = self.q_proj.weight if part == "q" else self.kv_proj.weight[: nkv * dh] if part == "k" else self.kv_proj.weight[nkv * dh:]
        else:
            start = {"q": 0, "k": nh * dh, "v": (nh + nkv) * dh}[part]
            w = self.qkv.weight[start: start + (nh if part == "q" else nkv) * dh]
        n = nh if part == "q" else nkv
        return w.view(n, dh, -1).transpose(1, 2)

    def _b(self, part: str) -> torch.Tensor:
        nh, nkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        n = nh if part == "q" else nkv
        if self.cross:
            b = self.q_proj.bias if part == "q" else self.kv_proj.bias
            if b is None:
                return torch.zeros(n, dh, device=self.o.weight.device, dtype=self.o.weight.dtype)
            b = b if part == "q" else (b[: nkv * dh] if part == "k" else b[nkv * dh:])
        else:
            if self.qkv.bias is None:
                return torch.zeros(n, dh, device=self.o.weight.device, dtype=self.o.weight.dtype)
            start = {"q": 0, "k": nh * dh, "v": (nh + nkv) * dh}[part]
            b = self.qkv.bias[start: start + n * dh]
        return b.view(n, dh)

    @property
    def W_Q(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._w("q")

    @property
    def W_K(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._w("k")

    @property
    def W_V(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self._w("v")

    @property
    def W_O(self) -> torch.Tensor:  # [head, d_head, d_model]
        return self.o.weight.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_Q(self) -> torch.Tensor:
        return self._b("q")

    @property
    def b_K(self) -> torch.Tensor:
        return self._b("k")

    @property
    def b_V(self) -> torch.Tensor:
        return self._b("v")

    @property
    def b_O(self) -> torch.Tensor:  # [d_model]
        if self.o.bias is None:
            return torch.zeros(self.o.out_features, device=self.o.weight.device, dtype=self.o.weight.dtype)
        return self.o.bias

    def forward(self, x: torch.Tensor, ctx: AttnContext, *, kv_input: torch.Tensor | None = None,
                past: LayerKV | None = None) -> torch.Tensor:
        """x [batch, pos, d_model] -> [batch, pos, d_model]."""
        cfg = self.cfg
        B, T, _ = x.shape
        nh, nkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        if self.cross:
            q = self.q_proj(x)
            k, v = self.kv_proj(kv_input).split([nkv * dh, nkv * dh], dim=-1)
        else:
            q, k, v = self.qkv(x).split([nh * dh, nkv * dh, nkv * dh], dim=-1)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        S_new = k.shape[1]
        q = q.view(B, T, nh, dh)
        k = k.view(B, S_new, nkv, dh)
        v = v.view(B, S_new, nkv, dh)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = hp(self.hook_q, q), hp(self.hook_k, k), hp(self.hook_v, v)
        if self.use_rope:
            cos, sin = ctx.rope
            q = hp(self.hook_rot_q, apply_rope(q, cos, sin, cfg.rope_interleaved))
            k = hp(self.hook_rot_k, apply_rope(k, cos, sin, cfg.rope_interleaved))
        if past is not None:
            k, v = past.append(k, v)

        if cfg.attn_kernel == "linear":
            z = self._linear(q, k, v, ctx)
        elif cfg.attn_kernel == "eager" or is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern):
            z = self._eager(q, k, v, ctx)
        else:
            z = self._sdpa(q, k, v, ctx)
        z = hp(self.hook_z, z)  # [batch, pos, head, d_head]
        gate = self.runtime.head_gates.get((self.stack, self.layer)) if self.runtime.head_gates else None
        if gate is not None:
            z = z * gate.to(z.dtype)[None, None, :, None]
        if self.runtime.use_attn_result or is_hooked(self.hook_result):
            result = hp(self.hook_result, torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return self.o(z.reshape(B, T, nh * dh))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        g = self.n_heads // self.n_kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=2)

    def _eager(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        B, T, nh, dh = q.shape
        nkv, S = k.shape[2], k.shape[1]
        g = nh // nkv
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [batch, kv_head, k, d_head]
        # GQA/MQA without copying K and V once per query head: the g query heads sharing a KV
        # head are stacked along the query axis, one matmul per KV head, and the result viewed
        # back as [batch, head, q, k] (head = kv_head * g + j, the order of repeat_interleave).
        qh = q.transpose(1, 2) if g == 1 else q.view(B, T, nkv, g, dh).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * T, dh)
        hard = ctx.hard()
        if (hard is not None and hard.shape[0] == 1 and ctx.pos_bias is None and ctx.temperature == 1.0
                and ctx.penalty is None):
            # The common case (a structural mask, no padding, bias, penalty or temperature): scale
            # and mask in the matmul's own epilogue, scores = min-or-0 + scale * q.k^T (baddbmm),
            # one pass over the [batch, head, q, k] buffer instead of three. Masked entries equal
            # finfo.min exactly, as masked_fill would write.
            bias = ctx.hard_bias(q.dtype, rows=g).reshape(g * T, S)  # one batch-free mask, [g * q, k]
            scores = torch.baddbmm(bias, qh.reshape(B * nkv, g * T, dh), kh.reshape(B * nkv, S, dh).transpose(1, 2),
                                   alpha=self.scale).view(B, nh, T, S)
            return self._softmax_pv(scores, vh, q.dtype, B, nh, nkv, g, T, S, dh)
        # One [batch, head, q, k] buffer, edited in place (none of these ops' backward needs the
        # overwritten values): with every hook cached each extra copy is fresh memory to fault in.
        scores = (qh @ kh.transpose(-1, -2)).mul_(self.scale).view(B, nh, T, S)  # [batch, head, q, k]
        if ctx.pos_bias is not None:
            scores = scores.add_(ctx.pos_bias.to(scores.dtype))
        if ctx.temperature != 1.0:
            scores = scores.div_(ctx.temperature)
        soft = ctx.soft(scores.dtype)
        if soft is not None:
            scores = scores.add_(soft)
        if hard is not None:
            scores = scores.masked_fill_(~hard, torch.finfo(scores.dtype).min)
        return self._softmax_pv(scores, vh, q.dtype, B, nh, nkv, g, T, S, dh)

    def _softmax_pv(self, scores, vh, dtype, B, nh, nkv, g, T, S, dh) -> torch.Tensor:
        scores = hp(self.hook_attn_scores, scores)
        pattern = torch.softmax(scores.float(), dim=-1).to(dtype)
        pattern = hp(self.hook_pattern, pattern)  # [batch, head, q, k]
        if g == 1:
            return (pattern @ vh).transpose(1, 2)  # [batch, pos, head, d_head]
        z = pattern.reshape(B, nkv, g * T, S) @ vh  # [batch, kv_head, g * q, d_head]
        return z.view(B, nh, T, dh).transpose(1, 2)

    def _sdpa(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        mask, is_causal = ctx.sdpa_mask(q.dtype)
        g = self.n_heads // self.n_kv_heads
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal,
            scale=self.scale / ctx.temperature, enable_gqa=g > 1,
        )
        return z.transpose(1, 2)

    def _linear(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        phi = (lambda t: F.elu(t) + 1) if self.cfg.linear_feature_map == "elu" else F.relu
        qf = hp(self.hook_q_feat, phi(q))  # [batch, pos, head, d_head]
        kf = hp(self.hook_k_feat, phi(self._repeat_kv(k)))  # [batch, pos, head, d_head]
        vv = self._repeat_kv(v)
        if ctx.padding is not None:
            kf = kf * ctx.padding[:, :, None, None].to(kf.dtype)
        causal = ctx.mask.is_causal
        eps = 1e-6
        if is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern) or len(ctx.q_pos) != kf.shape[1]:
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


# --------------------------------------------------------------------------------------------
# FFN and mixture of experts
# --------------------------------------------------------------------------------------------
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
        self.fc_in = Linear(cfg.d_model, self.d_mlp * (2 if self.gated else 1), bias=cfg.mlp_bias)  # [gate; up]
        self.fc_out = Linear(self.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_in(self) -> torch.Tensor:  # [d_model, d_mlp] (the up projection for gated FFNs)
        return self.fc_in.weight[-self.d_mlp:].T

    @property
    def W_gate(self) -> torch.Tensor | None:  # [d_model, d_mlp]
        return self.fc_in.weight[: self.d_mlp].T if self.gated else None

    @property
    def W_out(self) -> torch.Tensor:  # [d_mlp, d_model]
        return self.fc_out.weight.T

    @property
    def b_in(self) -> torch.Tensor:
        if self.fc_in.bias is None:
            return torch.zeros(self.d_mlp, device=self.fc_in.weight.device, dtype=self.fc_in.weight.dtype)
        return self.fc_in.bias[-self.d_mlp:]

    @property
    def b_out(self) -> torch.Tensor:
        if self.fc_out.bias is None:
            return torch.zeros(self.fc_out.out_features, device=self.fc_out.weight.device, dtype=self.fc_out.weight.dtype)
        return self.fc_out.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class MoE(nn.Module):
    """Top-k mixture of experts (Shazeer et al. 2017; Fedus et al. 2021; Jiang et al. 2024).

    Router: ``softmax_topk`` (softmax over all experts, keep the top k, optionally renormalise:
    Mixtral, OLMoE, Qwen2-MoE) or ``topk_softmax`` (softmax over the top-k logits). Experts run
    batched by expert: each sees only its routed tokens, and its hooks ``experts.{e}.hook_pre``
    / ``hook_post`` are [tokens_routed_to_e, d_mlp]. Shared experts (Qwen2-MoE, DeepSeekMoE) see
    every token. ``expert_mask`` (bool [expert]) removes experts at run time; the router
    renormalises over the rest. After each forward ``last_losses`` holds the Switch load-balancing
    loss ``N * sum_i f_i P_i`` and the router z-loss ``mean(logsumexp(logits)^2)`` (unweighted).
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
        self.expert_mask: torch.Tensor | None = None
        self.last_losses: dict[str, torch.Tensor] = {}
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
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

    def _losses(self, lf, probs, idx, token_mask) -> None:
        """Switch load balancing (Fedus et al. 2021, eq. 4) and ST-MoE z-loss (Zoph et al. 2022)."""
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
        self.last_losses = {"aux": E * (f * P).sum(), "z": (lse**2).mean() if lse.numel() else lse.sum()}


# --------------------------------------------------------------------------------------------
# the block
# --------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One residual block; pre-norm, post-norm or parallel, optional cross-attention.

    ::

        pre-norm:  x + attn(ln1 x) -> resid_mid;  resid_mid + mlp(ln2 resid_mid) -> resid_post
        post-norm: ln1(x + attn x) -> resid_mid;  ln2(resid_mid + mlp resid_mid) -> resid_post
        parallel:  x + attn(ln1 x) + mlp(ln2 x) -> resid_post            (GPT-J / NeoX)
    """

    def __init__(self, cfg: ModelConfig, *, stack: str, layer: int, runtime: Runtime,
                 cross: bool = False, moe: bool = False, causal_rel: bool = True):
        super().__init__()
        self.cfg, self.layer, self.has_cross = cfg, layer, cross
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, stack=stack, layer=layer, runtime=runtime)
        if cross:
            self.ln_cross = make_norm(cfg)
            self.cross_attn = Attention(cfg, stack=stack + ".cross", layer=layer, cross=True, runtime=runtime)
            self.hook_cross_attn_out = HookPoint()  # [batch, pos, d_model]
            self.hook_resid_mid_cross = HookPoint()  # [batch, pos, d_model]
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg)
            self.mlp = MoE(cfg) if moe else MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        if not (cfg.attn_only or cfg.parallel_attn_mlp):
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        if not cfg.attn_only:
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def _mlp(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(x, token_mask) if isinstance(self.mlp, MoE) else self.mlp(x)

    def forward(self, x: torch.Tensor, ctx: AttnContext, *, past: LayerKV | None = None,
                enc: torch.Tensor | None = None, cross_ctx: AttnContext | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        x = hp(self.hook_resid_pre, x)
        if cfg.parallel_attn_mlp:
            a = hp(self.hook_attn_out, self.attn(_norm(self.ln1, x), ctx, past=past))
            m = hp(self.hook_mlp_out, self._mlp(_norm(self.ln2, x), token_mask))
            return hp(self.hook_resid_post, x + a + m)
        post = cfg.norm_placement == "post"
        a = hp(self.hook_attn_out, self.attn(x if post else _norm(self.ln1, x), ctx, past=past))
        x = _norm(self.ln1, x + a) if post else x + a
        if cfg.attn_only:
            return hp(self.hook_resid_post, x)
        x = hp(self.hook_resid_mid, x)
        if self.has_cross:
            c = hp(self.hook_cross_attn_out, self.cross_attn(x if post else _norm(self.ln_cross, x), cross_ctx, kv_input=enc))
            x = _norm(self.ln_cross, x + c) if post else x + c
            x = hp(self.hook_resid_mid_cross, x)
        m = hp(self.hook_mlp_out, self._mlp(x if post else _norm(self.ln2, x), token_mask))
        x = _norm(self.ln2, x + m) if post else x + m
        return hp(self.hook_resid_post, x)
