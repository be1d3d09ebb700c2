"""Hook plumbing shared by every model: calling hook points, checking names, recording caches.

The hook points themselves are TransformerLens' ``HookPoint``; this module holds what interp
adds around them:

- :func:`hp` calls a hook point only when something is registered on it, so an unhooked model
  pays no per-hook module-call overhead, and a hooked one never skips a registered hook.
- :class:`HookDict` is the model's ``hook_dict`` / ``mod_dict``: an unknown name raises
  :class:`interp.errors.HookNameError` listing the closest real names.
- :func:`cache_names_filter` and :func:`as_activation_cache` are the two halves of
  ``run_with_cache`` around TransformerLens' own: check the requested names, skip the opt-in
  ``hook_result`` when caching everything, and return a real ``ActivationCache`` (TL 4.3
  returns a plain dict).
- :func:`note_recorded_memory` tells :mod:`interp.perf.memory` how large a recording was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

from interp.errors import unknown_hook_error
from interp.perf.memory import note_recorded, reuses_recorded_memory

NamesFilter = str | list[str] | tuple[str, ...] | Callable[[str], bool] | None


def hp(hook: HookPoint, x: Any) -> Any:
    """Pass ``x`` through ``hook`` only if something watches it: a registered hook (forward or
    backward), or a forward replaced on the instance (see :func:`is_reached`)."""
    if hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks:
        return hook(x)
    if "forward" in hook.__dict__:
        return hook(x)
    return x


def is_reached(hook: HookPoint) -> bool:
    """Whether a tool watches ``hook``: a registered hook, or a ``forward`` set on the instance.

    nnsight (0.8) registers no torch hooks: it puts a controller in each wrapped module's
    ``__dict__["forward"]`` and expects every module to be called, in order; a skipped hook
    point makes its trace raise an out-of-order error. Any instance-level forward is treated
    the same way, so such tools see every hook point and unwrapped models keep the fast path.
    """
    return is_hooked(hook) or "forward" in hook.__dict__


def is_hooked(hook: HookPoint) -> bool:
    """Whether anything is registered on ``hook`` (so a fast path must not skip it)."""
    return bool(hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks)


class HookDict(dict):
    """A dict of hook points whose missing keys raise an error naming the closest real ones."""

    def __missing__(self, key: str) -> Any:
        raise unknown_hook_error(str(key), self.keys())


def check_hook_names(hook_dict: Mapping[str, HookPoint], names: Iterable[str]) -> None:
    """Raise :class:`interp.errors.HookNameError` for the first name not in ``hook_dict``."""
    for n in names:
        if n not in hook_dict:
            raise unknown_hook_error(str(n), hook_dict.keys())


#: TransformerLens' opt-in hook points (name suffix -> the config flag that turns it on)
OPT_IN_HOOKS: dict[str, str] = {
    "attn.hook_result": "use_attn_result",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_attn_in": "use_attn_in",
    "hook_mlp_in": "use_hook_mlp_in",
    "hook_tokens": "use_hook_tokens",
}


def opt_in_off(name: str, flags: Mapping[str, bool]) -> bool:
    """Whether ``name`` is an opt-in hook point whose flag is off in ``flags``."""
    return any(name.endswith(s) and not flags.get(f, False) for s, f in OPT_IN_HOOKS.items())


def cache_names_filter(
    hook_dict: Mapping[str, HookPoint], names_filter: NamesFilter, use_attn_result: bool,
    flags: Mapping[str, bool] | None = None,
) -> NamesFilter:
    """The ``names_filter`` to hand TransformerLens' ``run_with_cache``.

    Names given as a string or a list must exist (TransformerLens would silently cache
    nothing). With no filter, the opt-in hook points (:data:`OPT_IN_HOOKS`) whose flag is off
    are skipped, as TransformerLens' cache leaves them out: caching one would switch on its
    computation (``hook_result``, the split q/k/v inputs) for every layer."""
    if isinstance(names_filter, str | list | tuple):
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        check_hook_names(hook_dict, names)
        return names
    if names_filter is None:
        on = {**(flags or {}), "use_attn_result": use_attn_result}
        return lambda name: not opt_in_off(name, on)
    return names_filter


def as_activation_cache(
    cache: ActivationCache | dict, model: nn.Module, return_cache_object: bool, has_batch_dim: bool
) -> ActivationCache | dict:
    """Wrap TransformerLens' plain-dict cache in an ``ActivationCache`` when one is wanted."""
    if return_cache_object and not isinstance(cache, ActivationCache):
        return ActivationCache(cache, model, has_batch_dim=has_batch_dim)
    return cache


def note_recorded_memory(cache: ActivationCache | dict) -> None:
    """Report the CPU bytes a recording kept (unique storages: views share them) to
    :mod:`interp.perf.memory`, whose policy may keep that much freed memory for the next
    recording instead of faulting it in afresh."""
    if not reuses_recorded_memory():
        return
    values = cache.cache_dict.values() if isinstance(cache, ActivationCache) else cache.values()
    storages = {}
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            st = v.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    note_recorded(sum(storages.values()))
