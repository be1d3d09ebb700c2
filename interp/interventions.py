"""Run-time interventions every interp model offers: other masks, head gates, expert masks.

:class:`Interventions` is a mixin of the model classes; each method changes one piece of the
run-time state listed in :mod:`interp.state`, validates its input, and names the fix in its
error. Nothing here touches the frozen config or the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import nn

from interp.components.attention import Attention
from interp.components.moe import MoE
from interp.errors import InterpError
from interp.masks import MaskSpec
from interp.state import AttentionChanges, AttentionOverride, StackLayer, check_attention_changes

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from interp.config import ModelConfig


class Interventions:
    """Mixin: attention overrides, head gates, expert masks, per-head results.

    The model sets ``self.attention_override = None`` in its constructor."""

    cfg: ModelConfig
    attention_override: AttentionOverride | None

    def _own_mask(self) -> MaskSpec:
        """The structural mask without any override (an encoder-decoder's decoder: causal)."""
        return self.cfg.mask

    @property
    def effective_mask(self) -> MaskSpec:
        """The structural mask in effect: an :meth:`override_attention` mask, else the config's."""
        o = self.attention_override
        return o.mask if o is not None else self._own_mask()

    @property
    def attention_settings(self) -> AttentionOverride:
        """Mask, soft-mask penalty and temperature in effect (the override's, else the config's)."""
        if self.attention_override is not None:
            return self.attention_override
        cfg = self.cfg
        return AttentionOverride(self._own_mask(), cfg.soft_mask_penalty, cfg.attn_temperature)

    @contextlib.contextmanager
    def override_attention(self, **changes: Unpack[AttentionChanges]) -> Iterator[None]:
        """Run the same weights under another mask, a soft penalty, or a temperature.

        Keyword arguments (any subset): ``mask`` (a MaskSpec or a string such as
        "causal&sliding_window:4"), ``soft_mask_penalty`` (a float >= 0, or None for a hard
        mask), ``temperature`` (> 0). What is left out keeps its current value; blocks nest,
        and leaving a block restores the settings before it.

        >>> # with model.override_attention(mask="causal&sliding_window:4"): model(tokens)
        """
        checked = check_attention_changes(dict(changes), self.cfg.attn_kernel == "linear")
        saved = self.attention_override
        self.attention_override = dataclasses.replace(self.attention_settings, **checked)
        try:
            yield
        finally:
            self.attention_override = saved

    def _stack(self, stack: str) -> nn.ModuleList:
        """The ModuleList of blocks named by ``stack`` (a ".cross" suffix names its
        cross-attention)."""
        blocks = getattr(self, stack.split(".")[0], None) if isinstance(stack, str) else None
        if (
            not isinstance(blocks, nn.ModuleList)
            or stack.count(".") > 1
            or stack.split(".", 1)[1:] not in ([], ["cross"])
        ):
            names = [
                n
                for n in ("blocks", "encoder", "decoder")
                if isinstance(getattr(self, n, None), nn.ModuleList)
            ]
            raise InterpError(f"Unknown stack {stack!r}; this model's stacks: {', '.join(names)}.")
        return blocks

    def _attention_modules(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]  # type: ignore[attr-defined]

    def set_head_gates(
        self, gates: Float[torch.Tensor, "layer head"] | None, stack: str = "blocks"
    ) -> None:
        """Multiply each head's output (``hook_z``) by a gate, [n_layers, n_heads] (Michel et
        al. 2019). Gates may require grad: dL/d gate is the head-importance signal. None
        removes them. ``stack`` is "blocks", or "encoder", "decoder", "decoder.cross"
        (cross-attention heads)."""
        blocks = self._stack(stack)
        cross = stack.endswith(".cross")
        if cross and not getattr(blocks[0], "has_cross", False):
            raise InterpError(f"Stack {stack.split('.')[0]!r} has no cross-attention.")
        attns = [b.cross_attn if cross else b.attn for b in blocks]
        if gates is None:
            for attn in attns:
                attn.head_gate = None
            return
        if gates.shape != (len(blocks), self.cfg.n_heads):
            raise InterpError(
                f"head gates must have shape ({len(blocks)}, {self.cfg.n_heads}), "
                f"got {tuple(gates.shape)}."
            )
        for layer, attn in enumerate(attns):
            attn.head_gate = gates[layer]

    @property
    def head_gates(self) -> dict[StackLayer, torch.Tensor]:
        """Every head gate in place, keyed by (stack, layer); empty when none is set."""
        return {a.where: a.head_gate for a in self._attention_modules() if a.head_gate is not None}

    def set_expert_mask(
        self, layer: int, mask: Bool[torch.Tensor, " expert"] | None, stack: str = "blocks"
    ) -> None:
        """Disable experts of one MoE layer (bool [n_experts], True = kept); None restores all."""
        blocks = self._stack(stack)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise InterpError(f"layer must be an integer in 0..{len(blocks) - 1}, got {layer!r}.")
        mlp = getattr(blocks[layer], "mlp", None)
        if not isinstance(mlp, MoE):
            raise InterpError(f"Layer {layer} has no mixture of experts.")
        if mask is not None and (mask.shape != (mlp.n_experts,) or int(mask.sum()) < mlp.k):
            raise InterpError(
                f"expert mask must be bool [{mlp.n_experts}] keeping at least "
                f"top_k={mlp.k} experts."
            )
        mlp.expert_mask = None if mask is None else mask.bool()

    def set_use_attn_result(self, use: bool) -> None:
        """Compute ``hook_result`` (per-head outputs) in every forward, as TransformerLens'
        flag."""
        self._set_use_flag("use_attn_result", use)
        for attn in self._attention_modules():
            attn.use_attn_result = bool(use)

    def set_use_split_qkv_input(self, use: bool) -> None:
        """Give each head its own copy of the residual for q (``hook_q_input``, [batch, pos,
        head, d_model]) and each KV head its own for k and v (``hook_k_input``,
        ``hook_v_input``, [batch, pos, kv_head, d_model]), as TransformerLens' flag; the norm
        is applied to each copy."""
        self._set_use_flag("use_split_qkv_input", use)

    def set_use_attn_in(self, use: bool) -> None:
        """Give each head its own copy of the residual entering attention (``hook_attn_in``,
        [batch, pos, head, d_model]), as TransformerLens' flag. With grouped KV heads, KV head
        j reads the copy of its group's first query head."""
        self._set_use_flag("use_attn_in", use)

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """Fire ``hook_mlp_in`` (the residual entering the MLP's norm), as TransformerLens."""
        self._set_use_flag("use_hook_mlp_in", use)

    def set_use_hook_tokens(self, use: bool) -> None:
        """Fire ``hook_tokens`` (the ids entering the embedding), as TransformerLens."""
        self._set_use_flag("use_hook_tokens", use)

    def _set_use_flag(self, name: str, use: bool) -> None:
        """Swap ``cfg`` for a copy with ``name=use`` in the model and in every module sharing
        it, so that ``model.cfg.use_*`` reads what the forward does (TransformerLens code
        reads the flags there)."""
        if not isinstance(use, bool):
            raise InterpError(f"set_{name} takes True or False, got {use!r}.")
        old = self.cfg
        new = old.replace(**{name: use})
        for module in self.modules():  # type: ignore[attr-defined]
            if getattr(module, "cfg", None) is old:
                module.cfg = new

    @property
    def use_flags(self) -> dict[str, bool]:
        """TransformerLens' opt-in hook flags as the forward uses them (name -> on)."""
        names = ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens")
        return {"use_attn_result": self.use_attn_result} | {n: getattr(self.cfg, n) for n in names}

    @property
    def use_attn_result(self) -> bool:
        """Whether every forward computes ``hook_result`` (see :meth:`set_use_attn_result`)."""
        return any(a.use_attn_result for a in self._attention_modules())
