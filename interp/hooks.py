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
    """Pass ``x`` through ``hook`` only if a hook is registered on it (forward or backward)."""
    if hook._forward_hooks or hook._backward_hooks or hook._forward_pre_hooks:
        return hook(x)
    return x


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


def cache_names_filter(
    hook_dict: Mapping[str, HookPoint], names_filter: NamesFilter, use_attn_result: bool
) -> NamesFilter:
    """The ``names_filter`` to hand TransformerLens' ``run_with_cache``.

    Names given as a string or a list must exist (TransformerLens would silently cache
    nothing). With no filter, ``hook_result`` is skipped unless the model computes per-head
    results (it is opt-in, as in TransformerLens)."""
    if isinstance(names_filter, str | list | tuple):
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        check_hook_names(hook_dict, names)
        return names
    if names_filter is None and not use_attn_result:
        return lambda name: not name.endswith("hook_result")
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
