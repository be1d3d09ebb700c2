"""Incremental decoding: the KV cache, when it is exact, and the decoder's sampling loop.

A KV cache is exact only if no position may see a token generated after it; a soft penalty
or a bidirectional / prefix mask past the prompt breaks that, and generation then recomputes
every step instead (:func:`cache_is_exact`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from interp.components.attention import LayerKV
from interp.errors import InterpError
from interp.state import AttentionOverride

if TYPE_CHECKING:
    from interp.config import ModelConfig


class KVCache:
    """Per-layer keys and values for incremental decoding (:meth:`HookedTransformer.generate`)."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.attention_mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[1]


def cache_is_exact(settings: AttentionOverride, prompt_len: int, total_len: int) -> bool:
    """Whether incremental decoding equals recomputation under ``settings``: no position may
    see a later generated token (a soft penalty, a bidirectional or prefix mask past the prompt
    would)."""
    if settings.soft_mask_penalty is not None:
        return False
    if settings.mask.is_causal:
        return True
    allowed = settings.mask.build(total_len, total_len)  # [q, k]
    return not bool(allowed.triu(1)[:, prompt_len:].any())


def _next_token(
    last: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next ids [batch] from the last logits [batch, vocab]."""
    if not (temperature and temperature > 0):
        return last.argmax(-1)
    last = last / temperature
    if top_k:
        kth = last.topk(top_k, dim=-1).values[:, -1:]
        last = last.masked_fill(last < kth, float("-inf"))
    probs = torch.softmax(last, -1).cpu()
    return torch.multinomial(probs, 1, generator=gen).to(last.device)[:, 0]


class DecoderGeneration:
    """Mixin of :class:`interp.model.HookedTransformer`: ``generate`` for causal LMs."""

    cfg: ModelConfig
    attention_settings: AttentionOverride

    @torch.no_grad()
    def generate(
        self,
        tokens: Int[torch.Tensor, "batch pos"] | str,
        max_new_tokens: int = 20,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        attention_mask: torch.Tensor | None = None,
        seed: int | None = None,
    ) -> Int[torch.Tensor, "batch total"] | str:
        """Greedy (temperature 0) or sampled continuation with a KV cache; returns all tokens
        [batch, pos + new] (or a string when given a string). Under a mask that lets a position
        see later tokens (a soft penalty, bidirectional or prefix past the prompt) the cache
        would be stale, so every step is recomputed instead."""
        model: Any = self
        if self.cfg.architecture != "decoder":
            raise InterpError("generate needs a decoder (a causal language model).")
        as_text = isinstance(tokens, str)
        if as_text:
            tokens = model.to_tokens(tokens)
        tokens = model._check_tokens(tokens)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InterpError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        total = tokens.shape[1] + max_new_tokens
        use_cache = use_cache and cache_is_exact(self.attention_settings, tokens.shape[1], total)
        cache = KVCache(self.cfg.n_layers) if use_cache else None
        out = tokens
        mask = attention_mask
        logits = model(tokens, attention_mask=mask, past_kv=cache, return_type="logits")
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = _next_token(logits[:, -1].float(), temperature, top_k, gen)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
            if cache is not None:
                logits = model(nxt[:, None], past_kv=cache, return_type="logits")
            else:
                logits = model(out, attention_mask=mask, return_type="logits")
        return model.to_string(out[0]) if as_text else out
