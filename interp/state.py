"""Every piece of run-time state a model carries, in one place.

The config (:class:`interp.config.ModelConfig`) is frozen: it says what the model *is*. What an
analysis switches on for a while (another mask, gated heads, ablated experts) is run-time state.
Each kind is one typed attribute, changed only through the model method named beside it:

- ``model.attention_override`` (:class:`AttentionOverride` or None): the mask, soft-mask
  penalty and temperature in effect inside ``with model.override_attention(...)``; None outside
  any such block (the config's settings apply).
- ``attn.head_gate`` (``Tensor [head]`` or None) on each attention module, a multiplier on its
  ``hook_z``: ``model.set_head_gates(gates, stack)``. ``model.head_gates`` reads them all as a
  ``{StackLayer: Tensor}`` dict.
- ``attn.use_attn_result`` (bool) on each attention module, compute ``hook_result`` in every
  forward: ``model.set_use_attn_result(use)``; ``model.use_attn_result`` reads it.
- TransformerLens' opt-in hook flags (``use_split_qkv_input``, ``use_attn_in``,
  ``use_hook_mlp_in``, ``use_hook_tokens``, and ``use_attn_result`` above): config fields, so
  ``model.set_use_*(bool)`` swaps the model's config for a replaced copy, shared by every module
  that held the old one (TransformerLens code reads ``model.cfg.use_*``);
  ``model.use_flags`` reads them all.
- ``moe.expert_mask`` (bool ``Tensor [expert]`` or None) on each MoE layer, the experts kept:
  ``model.set_expert_mask(layer, mask)``.
- ``moe.last_losses`` (``{"aux", "z"}``), written by every MoE forward; ``model.moe_losses()``
  reads them weighted by the config.
- ``model.prepend_bos`` (bool): whether text gets BOS first; the same value as
  ``cfg.default_prepend_bos`` (TransformerLens' name; setting ``model.prepend_bos`` replaces the
  config). Loaders set it from the checkpoint's tokenizer; every text-reading method takes a
  ``prepend_bos=`` override for one call (:mod:`interp.text_inputs`).
- ``model.tokenizer`` (a Hugging Face style tokenizer or None): set by loaders or the
  constructor.

``model.effective_mask`` (read-only) is the structural mask in effect: the override's, else the
config's. Per-forward state (positions, masks and score biases of one pass) is not run-time
state: it is built afresh by each forward as an :class:`interp.components.AttnContext`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

from interp.errors import InterpError
from interp.masks import MaskSpec, parse_mask


class StackLayer(NamedTuple):
    """Where an attention module sits: its stack and its layer index.

    ``stack`` is "blocks" (decoder-only and encoder-only models), "encoder", "decoder", or
    "decoder.cross" (the decoder's cross-attention)."""

    stack: str
    layer: int


@dataclass(frozen=True)
class AttentionOverride:
    """The attention settings an ``override_attention`` block runs under.

    Every field is the value in effect inside the block: those the call did not change are
    copied from the enclosing block, or from the config outside any block, so readers never
    ask "was this overridden?"."""

    mask: MaskSpec  # the structural mask (an encoder-decoder's decoder: its causal mask)
    soft_mask_penalty: float | None  # finite penalty on masked keys; None = a hard mask
    temperature: float  # softmax(scores / temperature)


class AttentionChanges(TypedDict, total=False):
    """The keyword arguments of ``override_attention``: any subset of these fields.

    A field left out keeps its current value; ``soft_mask_penalty=None`` means a hard mask."""

    mask: MaskSpec | str
    soft_mask_penalty: float | None
    temperature: float


def _is_number(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float)


def check_attention_changes(changes: dict, linear_kernel: bool) -> dict:
    """Validate ``override_attention``'s keyword arguments; returns them with a parsed mask.

    Raises :class:`InterpError` naming the bad argument (an unknown name lists the valid ones),
    and for linear attention, which has no softmax, any penalty, temperature other than 1, or a
    mask other than causal or bidirectional."""
    unknown = sorted(set(changes) - set(AttentionChanges.__annotations__))
    if unknown:
        valid = ", ".join(AttentionChanges.__annotations__)
        raise InterpError(f"override_attention got unknown argument {unknown[0]!r}; use {valid}.")
    out = dict(changes)
    if "mask" in out:
        mask = parse_mask(out["mask"]) if isinstance(out["mask"], str) else out["mask"]
        if not isinstance(mask, MaskSpec):
            raise InterpError(
                "mask must be a MaskSpec or a string such as 'causal&sliding_window:4', "
                f"got {type(mask).__name__}; leave it out to keep the current mask."
            )
        out["mask"] = mask
    penalty = out.get("soft_mask_penalty")
    if penalty is not None and (not _is_number(penalty) or math.isnan(penalty) or penalty < 0):
        raise InterpError(f"soft_mask_penalty must be >= 0, got {penalty!r}.")
    if "temperature" in out:
        t = out["temperature"]
        if not _is_number(t) or not math.isfinite(t) or t <= 0:
            raise InterpError(
                f"temperature must be > 0 and finite, got {t!r}; "
                "leave it out to keep the current temperature."
            )
    if linear_kernel:
        if penalty is not None or out.get("temperature", 1.0) != 1.0:
            raise InterpError(
                "Linear attention has no softmax, so soft_mask_penalty and temperature "
                "do not apply to it."
            )
        if "mask" in out and not (out["mask"].is_causal or out["mask"].is_full):
            raise InterpError("Linear attention supports only causal or bidirectional masks.")
    return out
