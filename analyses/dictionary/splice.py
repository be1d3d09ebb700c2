"""Splice SAEs and transcoders into a model at any hook, as hook points of the model.

``with splice(model, sae): model(tokens)`` replaces the activation at ``sae.cfg.hook_name``
(a transcoder: at ``hook_name_out``, predicted from ``hook_name``) by the SAE's
reconstruction plus the reconstruction error, each through its own hook point named under the
hook it replaces (SAELens' ``HookedSAETransformer`` naming)::

    blocks.2.hook_resid_post.hook_sae_input    what the SAE reads      [batch, pos, d_in]
    blocks.2.hook_resid_post.hook_sae_acts     the feature activations [batch, pos, d_sae]
    blocks.2.hook_resid_post.hook_sae_recons   the reconstruction      [batch, pos, d_in]
    blocks.2.hook_resid_post.hook_sae_error    original - reconstruction
    blocks.2.hook_resid_post.hook_sae_output   what the model continues with

so ``run_with_cache`` records feature activations and ``run_with_hooks`` ablates or steers
features like any other hook. Why keep the error: with it the spliced model computes exactly
what the original did (bit for bit when nothing is edited: the output is then ``x + (recons -
recons)``), and an edit to ``hook_sae_acts`` changes the model by exactly the edit's decoded
effect, not by the SAE's reconstruction error as well (Marks et al. 2024, "Sparse Feature
Circuits", keep the error node for this reason). ``keep_error=False`` measures the SAE itself:
the model then continues with the reconstruction alone (the "CE loss recovered" metric).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from analyses.dictionary.sae import SAE
from interp.errors import InterpError
from interp.hooks import HookDict

__all__ = ["HOOK_SUFFIXES", "splice"]

HOOK_SUFFIXES = ("hook_sae_input", "hook_sae_acts", "hook_sae_recons", "hook_sae_error",
                 "hook_sae_output")


def _rebuild_hook_dict(model: Any) -> None:
    """Re-run TransformerLens' ``setup`` so the added (or removed) hook points are listed, and
    keep the model's error-naming dicts."""
    model.setup()
    model.mod_dict = HookDict(model.mod_dict)
    model.hook_dict = HookDict(model.hook_dict)


def _replacer(sae: SAE, keep_error: bool, inputs: dict[str, torch.Tensor] | None,
              skip_first: bool) -> Any:
    """The forward hook on the replaced hook point: SAE output (+ error) instead of ``x``."""

    def hook(module: Any, args: Any, x: torch.Tensor) -> torch.Tensor:
        source = inputs["x"] if inputs is not None else x
        recons = sae(source)
        if not keep_error:
            if skip_first and x.ndim >= 3 and x.shape[1] > 1:
                recons = torch.cat([x[:, :1], recons[:, 1:]], dim=1)
            return sae.hook_sae_output(recons)
        edited = any(h._forward_hooks for h in (sae.hook_sae_input, sae.hook_sae_acts,
                                                 sae.hook_sae_recons))
        clean = sae.decode(sae.encode(source)).to(x.dtype) if edited else recons
        err = x - clean
        seen = sae.hook_sae_error(err)
        # x + (recons - clean) is x exactly when nothing was edited; recons + err is not
        out = x + (recons - clean) if seen is err else recons + seen
        return sae.hook_sae_output(out)

    return hook


@contextmanager
def splice(model: Any, saes: SAE | Sequence[SAE], *, keep_error: bool = True,
           skip_first: bool = False) -> Iterator[Any]:
    """Splice ``saes`` into ``model`` for the ``with`` block (see the module docstring).

    ``skip_first`` (with ``keep_error=False``) leaves each sequence's first position as it
    was: SAEs trained without it (:func:`~analyses.dictionary.train.collect_activations`)
    cannot reconstruct its outsized norm, and a wrong attention-sink residual would break
    every later position's attention, measuring the sink rather than the SAE.

    Hook names are checked first: an unknown one raises the model's one-line error listing the
    closest real names. On exit the model is as before (its hook points, its hooks).
    """
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    targets: list[tuple[SAE, str]] = []
    for sae in saes:
        out_name = sae.cfg.hook_name_out or sae.cfg.hook_name
        if not sae.cfg.hook_name:
            raise InterpError("This SAE has no hook_name; set one with "
                              "sae.with_config(hook_name='blocks.0.hook_resid_post').")
        model.check_hook_names([sae.cfg.hook_name, out_name])
        if any(out_name == t for _, t in targets):
            raise InterpError(f"Two SAEs replace {out_name}; splice one per hook.")
        targets.append((sae, out_name))
    handles: list[Any] = []
    attached: list[tuple[Any, str]] = []
    try:
        for sae, out_name in targets:
            sae.to(model.device)
            point = model.hook_dict[out_name]
            inputs: dict[str, torch.Tensor] | None = None
            if sae.cfg.is_transcoder:
                store: dict[str, torch.Tensor] = {}
                inputs = store

                def keep(module: Any, args: Any, x: torch.Tensor,
                         store: dict[str, torch.Tensor] = store) -> None:
                    store["x"] = x

                handles.append(model.hook_dict[sae.cfg.hook_name].register_forward_hook(keep))
            replace = _replacer(sae, keep_error, inputs, skip_first)
            handles.append(point.register_forward_hook(replace))
            for suffix in HOOK_SUFFIXES:
                point.add_module(suffix, getattr(sae, suffix))
                attached.append((point, suffix))
        _rebuild_hook_dict(model)
        yield model
    finally:
        for h in handles:
            h.remove()
        for point, suffix in attached:
            delattr(point, suffix)
        for sae, _ in targets:
            for suffix in HOOK_SUFFIXES:
                getattr(sae, suffix).remove_hooks("both", including_permanent=True)
        _rebuild_hook_dict(model)
