"""The attention context: positions, masks and score biases of one forward pass of one stack.

Built once per forward by the model and shared by every layer of the stack, so a mask or a
position bias is computed once, not once per layer; each piece is built lazily and cached on
the context (a stack whose layers all run SDPA never builds the boolean mask, for instance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from interp.masks import MaskSpec, SlidingWindow
from interp.positions import rope_cos_sin

if TYPE_CHECKING:
    from interp.config import ModelConfig


class AttnContext:
    """Positions and masks of one forward pass of one stack.

    ``allowed`` is the structural mask (from a :class:`MaskSpec`), ``padding`` the tokenizer's
    attention mask; a soft penalty replaces -inf on structurally masked keys by a finite
    ``-penalty`` (padding always stays hard). ``pos_bias`` is ALiBi's or T5's [head, q, k] bias.
    """

    def __init__(
        self,
        *,
        q_pos: torch.Tensor,
        k_len: int,
        mask: MaskSpec,
        padding: torch.Tensor | None,
        penalty: float | None,
        temperature: float,
        pos_bias: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.q_pos, self.k_len, self.mask, self.padding = q_pos, k_len, mask, padding
        self.penalty, self.temperature = penalty, temperature
        self.pos_bias, self.rope = pos_bias, rope
        self._cache: dict[Any, Any] = {}
        #: the context of this stack's sliding layers (mask & window, their RoPE), or None
        self.local: AttnContext | None = None

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
                allowed = self.mask.allowed(self.q_pos[:, None], k[None, :])
                self._cache["structural"] = allowed.expand(len(self.q_pos), self.k_len)
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
            bias = None if s is None else torch.where(s, 0.0, -float(self.penalty)).to(dtype)
            self._cache[key] = None if bias is None else bias[None, None]
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
                out = torch.zeros(hard.shape, dtype=dtype, device=self.device)
                out = out.masked_fill_(~hard, torch.finfo(dtype).min)
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
            plain_causal = (
                self.mask.is_causal
                and self.penalty is None
                and self.padding is None
                and self.pos_bias is None
                and T == self.k_len
            )
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


def local_context(cfg: ModelConfig, ctx: AttnContext, dtype: torch.dtype,
                  row_pos: torch.Tensor | None = None) -> AttnContext:
    """The twin of a stack's context for its sliding layers: the same queries, padding and
    biases, the mask narrowed to ``mask & sliding_window(cfg.sliding_window)`` (a key is seen
    when ``q - k < window``, as transformers' ``sliding_window_overlay``), and the RoPE of
    ``rope_local_base`` (unscaled) where the config sets one, at ``row_pos`` [batch, pos]
    when padding shifts each row's positions (as the global layers' RoPE)."""
    rope = ctx.rope
    if cfg.positional == "rope" and cfg.rope_local_base is not None:
        rope = rope_cos_sin(ctx.q_pos if row_pos is None else row_pos, cfg.rotary_dim,
                            cfg.rope_local_base,
                            cfg.rope_interleaved, dtype)
    return AttnContext(q_pos=ctx.q_pos, k_len=ctx.k_len,
                       mask=ctx.mask & SlidingWindow(cfg.sliding_window), padding=ctx.padding,
                       penalty=ctx.penalty, temperature=ctx.temperature, pos_bias=ctx.pos_bias,
                       rope=rope)
