"""What the MoE analysis accepts: a model with MoE layers, and batches in three shapes.

Every entry point starts here, so a dense model or a malformed batch is one clear
:class:`~interp.errors.InterpError` before any forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from interp import HookedTransformer
from interp.errors import InterpError

__all__ = ["moe_layers"]

_FLOATS = (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool)


def moe_layers(model: HookedTransformer) -> list[int]:
    """Indices of the model's MoE layers; a dense model is an :class:`InterpError`."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise InterpError("The MoE analysis needs an interp.HookedTransformer (decoder or encoder) "
                          "with MoE layers.")
    layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    if not layers:
        raise InterpError("This model has no MoE layers (n_experts=0); the MoE analysis needs a "
                          "mixture-of-experts model such as a Mixtral/OLMoE checkpoint or "
                          "`interp train domains` with n_experts > 0.")
    return layers


def _as_batch(item: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch -> (tokens [batch, pos], domains [batch, pos] or None, valid [batch, pos] bool or
    None).

    Accepted: a token tensor; a tuple ``(tokens, domains)`` or ``(tokens, domains,
    attention_mask)`` (domains per sequence [batch] or per token [batch, pos], -1 = unlabelled);
    a dict with keys ``tokens``, optional ``domains`` / ``domain_ids`` and ``attention_mask``.
    """
    domains = mask = None
    if isinstance(item, dict):
        tokens = item.get("tokens")
        domains = item.get("domains", item.get("domain_ids"))
        mask = item.get("attention_mask")
    elif isinstance(item, tuple | list):
        if not 1 <= len(item) <= 3:
            raise InterpError("A batch tuple must be (tokens,), (tokens, domains) or (tokens, "
                              "domains, attention_mask).")
        tokens = item[0]
        domains = item[1] if len(item) > 1 else None
        mask = item[2] if len(item) > 2 else None
    else:
        tokens = item
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.dtype in _FLOATS:
        raise InterpError(f"Tokens must be integer ids of shape [batch, pos], got "
                          f"{tuple(tokens.shape)} {tokens.dtype}.")
    tokens = tokens.long()
    B, T = tokens.shape
    if domains is not None:
        domains = torch.as_tensor(domains).long()
        if domains.ndim == 1 and domains.shape[0] == B:
            domains = domains[:, None].expand(B, T)
        if tuple(domains.shape) != (B, T):
            raise InterpError(f"Domain ids must be [batch] or [batch, pos] = [{B}, {T}], got "
                              f"{tuple(domains.shape)}.")
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        if tuple(mask.shape) != (B, T):
            raise InterpError(f"attention_mask must be [batch, pos] = [{B}, {T}], got "
                              f"{tuple(mask.shape)}.")
    return tokens, domains, mask
