"""One pair batch's clean and corrupted runs, made once and reused by many patched forwards.

Activation patching runs the corrupted prompt once per site, so what every patched forward
shares is worth computing once per batch of pairs. Two things are shared exactly:

- **The prompts' common prefix.** In a causal model a position sees only earlier tokens, so
  before the first token where a clean and a corrupted prompt differ, both runs hold the same
  activations and patching there changes nothing. The prefix runs once into a frozen KV cache
  (:class:`interp.KVCache`); the clean, corrupted and patched runs process only the suffix
  that reads it (in IOI's ABC corruption, the last 4-6 of 14-18 tokens).
- **The layers below the patched site.** Patching a hook of block ``l`` leaves blocks ``< l``
  as in the corrupted run, so a patched forward starts at block ``l`` from the corrupted
  ``hook_resid_pre`` cached once (``start_at_layer``), and unembeds only the last position.

Both are skipped where they would not be exact: no prefix for a model whose mask lets a
position see later tokens (bidirectional, prefix-LM, soft masks; :func:`interp.generation.
cache_is_exact`), linear attention or selective attention; no shortcut at all for a raw hook
name outside the block pattern (``hook_embed``, ``ln_final.*``), which runs whole forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from analyses.circuits.pairs import PairBatch
from interp.generation import KVCache, cache_is_exact

__all__ = ["PairRuns", "shared_prefix"]

Hook = tuple[str, Callable]


def _prefix_allowed(model) -> bool:
    """Whether a KV cache of the shared prefix is exact for this model (a decoder stack with
    softmax attention that is not selective)."""
    cfg = model.cfg
    return (getattr(cfg, "architecture", "") == "decoder" and hasattr(model, "blocks")
            and getattr(cfg, "attn_kernel", "") != "linear"
            and not getattr(cfg, "selective_attention", False))


def shared_prefix(model, b: PairBatch) -> int:
    """How many leading positions every clean and corrupted prompt of ``b`` share, where a
    cached prefix is exact for ``model`` (else 0); at most ``pos - 1``, so the last position,
    where the metric is read, is always recomputed."""
    T = int(b.clean.shape[1])
    if T < 2 or not _prefix_allowed(model):
        return 0
    differs = (b.clean != b.corrupted).any(0).nonzero()
    d = int(differs[0]) if len(differs) else T - 1
    d = min(d, T - 1)
    if d < 1 or not cache_is_exact(model.attention_settings, d, T):
        return 0
    return d


class PairRuns:
    """The clean and corrupted runs of one pair batch (see the module docstring).

    ``clean`` holds the clean activations of ``hooks`` (suffix positions only when ``start``
    > 0); ``clean_last`` / ``corr_last`` the last-position logits [batch, d_vocab] (float).
    :meth:`run` is one patched forward of ``P`` stacked copies of the corrupted suffix.
    ``fast=False`` turns both shortcuts off (whole forwards, as for raw hook names).
    """

    def __init__(self, model, b: PairBatch, hooks: Sequence[str], layers: Sequence[int],
                 fast: bool = True) -> None:
        self.model, self.b, self.fast = model, b, fast
        self.n_layers = int(model.cfg.n_layers)
        self.start = shared_prefix(model, b) if fast else 0
        self._prefix: KVCache | None = None
        self._expanded: dict[int, KVCache] = {}
        if self.start:
            self._prefix = KVCache(self.n_layers)
            model(b.corrupted[:, :self.start], past_kv=self._prefix, stop_at_layer=self.n_layers)
            self._prefix.freeze()
        self.clean_tokens = b.clean[:, self.start:]
        self.corr_tokens = b.corrupted[:, self.start:]
        self.clean: dict[str, torch.Tensor] = {}
        self.clean_last = self._forward(self.clean_tokens, self._prefix, None,
                                        [(h, self._keep(self.clean)) for h in hooks])
        self.resid: dict[int, torch.Tensor] = {}
        starts = sorted({int(x) for x in layers if 0 < x < self.n_layers}) if fast else []
        kept: dict[str, torch.Tensor] = {}
        self.corr_last = self._forward(
            self.corr_tokens, self._prefix, None,
            [(f"blocks.{x}.hook_resid_pre", self._keep(kept)) for x in starts])
        self.resid = {x: kept[f"blocks.{x}.hook_resid_pre"] for x in starts}

    @staticmethod
    def _keep(store: dict) -> Callable:
        def keep(x: torch.Tensor, hook) -> torch.Tensor:
            store[hook.name] = x.detach().clone()
            return x
        return keep

    def _forward(self, tokens: torch.Tensor, cache: KVCache | None, layer: int | None,
                 hooks: list[Hook], residual: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits [rows, d_vocab] of ``tokens`` after ``cache``, from block
        ``layer`` with ``residual`` when given, with ``hooks`` on."""
        model = self.model
        with model.hooks(fwd_hooks=hooks):
            if not self.fast:
                return model(tokens)[:, -1].float()
            kw = {} if layer is None else {"start_at_layer": layer, "residual": residual}
            x = model(tokens, past_kv=cache, stop_at_layer=self.n_layers, **kw)
            last = tokens[:, -1:]
            logits = model(last, start_at_layer=self.n_layers, residual=x[:, -1:],
                           attention_mask=torch.ones_like(last))
        return logits[:, -1].float()

    def _cache_for(self, P: int) -> KVCache | None:
        """The prefix cache with its rows repeated ``P`` times (the stacked copies' order)."""
        if self._prefix is None:
            return None
        if P not in self._expanded:
            big = KVCache(self.n_layers)
            for mine, theirs in zip(big.layers, self._prefix.layers, strict=True):
                mine.k, mine.v = theirs.k.repeat(P, 1, 1, 1), theirs.v.repeat(P, 1, 1, 1)
            big.freeze()
            self._expanded = {P: big}  # one size at a time: groups are mostly one size
        return self._expanded[P]

    def run(self, P: int, layer: int, hooks: list[Hook]) -> torch.Tensor:
        """Last-position logits [P * batch, d_vocab] of ``P`` stacked copies of the corrupted
        suffix (copy ``p`` is rows ``p * batch .. (p + 1) * batch``), starting at block
        ``layer`` where its residual was kept, with ``hooks`` on."""
        tokens = self.corr_tokens.repeat(P, 1)
        if layer in self.resid:
            resid = self.resid[layer].repeat(P, 1, 1)
            return self._forward(tokens, self._cache_for(P), layer, hooks, resid)
        return self._forward(tokens, self._cache_for(P), None, hooks)
