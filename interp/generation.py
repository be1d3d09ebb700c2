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


class CacheEntry(LayerKV):
    """One layer's keys and values, with TransformerLens' names for them (``past_keys``,
    ``past_values``: [batch, pos_so_far, kv_head, d_head])."""

    @property
    def past_keys(self) -> torch.Tensor | None:
        return self.k

    @property
    def past_values(self) -> torch.Tensor | None:
        return self.v


class KVCache:
    """Per-layer keys and values for incremental decoding (:meth:`HookedTransformer.generate`).

    Also TransformerLens' ``HookedTransformerKeyValueCache`` (exported under that name): made
    by ``KVCache.init_cache(cfg, device, batch_size)``, passed as ``past_kv_cache=``, with
    ``entries[i].past_keys`` / ``past_values``, ``previous_attention_mask``, and ``freeze()``:
    a frozen cache is read by each forward but keeps what it held (many continuations of one
    prefix)."""

    def __init__(self, n_layers: int):
        self.layers = [CacheEntry() for _ in range(n_layers)]
        self.attention_mask: torch.Tensor | None = None
        self.frozen = False
        self._batch_size = 1

    @classmethod
    def init_cache(cls, cfg: Any, device: Any = None, batch_size: int = 1) -> KVCache:
        """An empty cache for a model of ``cfg`` (TransformerLens' constructor); the device is
        taken from the first keys written."""
        n = getattr(cfg, "n_decoder_layers", None) or cfg.n_layers
        cache = cls(n)
        cache._batch_size = batch_size
        return cache

    @property
    def seq_len(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[1]

    @property
    def entries(self) -> list[CacheEntry]:
        """TransformerLens' name for the per-layer entries."""
        return self.layers

    def __getitem__(self, idx: int) -> CacheEntry:
        return self.layers[idx]

    @property
    def previous_attention_mask(self) -> torch.Tensor:
        """The padding mask over the cached positions (1 = token), [batch, pos_so_far]."""
        if self.attention_mask is not None:
            return self.attention_mask
        k = self.layers[0].k
        batch = self._batch_size if k is None else k.shape[0]
        device = None if k is None else k.device
        return torch.ones((batch, self.seq_len), dtype=torch.long, device=device)

    def freeze(self) -> None:
        """Keep the cache as it is: later forwards read it and append nothing."""
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    def commit(self, past_len: int) -> None:
        """After a forward: a frozen cache drops what that forward appended."""
        if not self.frozen:
            return
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k[:, :past_len], layer.v[:, :past_len]
                if past_len == 0:
                    layer.k = layer.v = None
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :past_len] if past_len else None


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
    last: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """Next ids [batch] from the last logits [batch, vocab]: greedy, or sampled at
    ``temperature`` from the ``top_k`` most likely and / or the smallest set whose probability
    reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    if not do_sample or temperature == 0:
        return last.argmax(-1)
    last = last / temperature
    if top_k:
        kth = last.topk(min(top_k, last.shape[-1]), dim=-1).values[:, -1:]
        last = last.masked_fill(last < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = last.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (keep at least one)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        last = last.masked_fill(drop, float("-inf"))
    probs = torch.softmax(last, -1).cpu()
    return torch.multinomial(probs, 1, generator=gen).to(last.device)[:, 0]


def _check_sampling(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any,
                    freq_penalty: Any, return_type: Any) -> None:
    """One line per bad generation argument."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise InterpError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if not isinstance(temperature, int | float) or temperature < 0:
        raise InterpError(f"temperature must be a number >= 0, got {temperature!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InterpError(f"top_k must be an integer >= 1 or None, got {top_k!r}.")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise InterpError(f"top_p must be in (0, 1] or None, got {top_p!r}.")
    if not isinstance(freq_penalty, int | float):
        raise InterpError(f"freq_penalty must be a number, got {freq_penalty!r}.")
    if return_type not in ("input", "str", "tokens"):
        raise InterpError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}.")


def _eos_ids(model: Any, stop_at_eos: bool, eos_token_id: Any) -> list[int]:
    """The ids that end a row: ``eos_token_id`` (an id or a list), else the tokenizer's EOS
    when ``stop_at_eos``; none when neither is known."""
    if not stop_at_eos and eos_token_id is None:
        return []
    if eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise InterpError(f"eos_token_id must be an id or a list of ids, got {eos_token_id!r}.")
    return ids


class DecoderGeneration:
    """Mixin of :class:`interp.model.HookedTransformer`: ``generate`` for causal LMs."""

    cfg: ModelConfig
    attention_settings: AttentionOverride

    @torch.no_grad()
    def generate(
        self,
        input: Int[torch.Tensor, "batch pos"] | str | list[str] = "",
        max_new_tokens: int = 20,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str = "input",
        verbose: bool = False,
        *,
        attention_mask: torch.Tensor | None = None,
        seed: int | None = None,
        use_cache: bool | None = None,
    ) -> Int[torch.Tensor, "batch total"] | str | list[str]:
        """Continue ``input`` by ``max_new_tokens`` tokens (TransformerLens' arguments).

        ``input``: a string or a list of strings (tokenized by the model's BOS rule or
        ``prepend_bos``; a list is padded on ``padding_side``, left by default, with the padding
        masked) or ids [batch, pos] (with ``attention_mask`` for a padded batch).
        ``return_type="input"`` answers in the input's kind: text for text (the prompt and its
        continuation, BOS left out), ids [batch, pos + new] for ids; ``"str"`` / ``"tokens"``
        choose. Greedy unless ``do_sample`` (interp's default; TransformerLens samples by
        default): then ``temperature``, ``top_k``, ``top_p`` and ``freq_penalty`` (subtracted
        from a token's logit per earlier occurrence) shape the distribution; ``seed`` makes it
        repeatable. A row stops at EOS (``eos_token_id``, else the tokenizer's when
        ``stop_at_eos``) and is filled with EOS after. ``use_past_kv_cache`` (alias
        ``use_cache``) decodes incrementally; under a mask that lets a position see later tokens
        (a soft penalty, bidirectional or prefix past the prompt) the cache would be stale, so
        every step is recomputed instead. ``verbose`` shows a progress bar on stderr.

        Long because it is TransformerLens' generate: fifteen keyword arguments, documented
        here, and one sampling loop."""
        model: Any = self
        if self.cfg.architecture != "decoder":
            raise InterpError("generate needs a decoder (a causal language model).")
        _check_sampling(max_new_tokens, temperature, top_k, top_p, freq_penalty, return_type)
        as_text = isinstance(input, str) or (isinstance(input, list | tuple) and bool(input)
                                             and all(isinstance(t, str) for t in input))
        if as_text:
            side = padding_side or ("left" if not isinstance(input, str) else None)
            batch = model.text_batch(input, prepend_bos, side)
            tokens = batch.tokens.to(model.device)
            if attention_mask is None and not bool(batch.attention_mask.all()):
                attention_mask = batch.attention_mask.to(model.device)
        else:
            model._check_text_options(prepend_bos, padding_side)
            tokens = model._check_tokens(input)
        if use_cache is not None:
            use_past_kv_cache = use_cache
        eos = _eos_ids(model, stop_at_eos, eos_token_id)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        total = tokens.shape[1] + max_new_tokens
        exact = cache_is_exact(self.attention_settings, tokens.shape[1], total)
        cache = KVCache(self.cfg.n_layers) if use_past_kv_cache and exact else None
        out, mask = tokens, attention_mask
        logits = model(tokens, attention_mask=mask, past_kv=cache, return_type="logits")
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        eos_t = torch.tensor(eos, device=tokens.device)
        steps = range(max_new_tokens)
        if verbose:
            from interp.progress import progress_bar

            steps = progress_bar()(steps, desc="generate", total=max_new_tokens)
        for _ in steps:
            last = logits[:, -1].float()
            if freq_penalty:
                counts = torch.zeros_like(last).scatter_add_(
                    -1, out, torch.ones_like(out, dtype=last.dtype))
                last = last - freq_penalty * counts
            nxt = _next_token(last, do_sample, temperature, top_k, top_p, gen)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
                done = done | torch.isin(nxt, eos_t)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            if eos and bool(done.all()):
                break
            if cache is not None:
                logits = model(nxt[:, None], past_kv=cache, return_type="logits")
            else:
                logits = model(out, attention_mask=mask, return_type="logits")
        if return_type == "tokens" or (return_type == "input" and not as_text):
            return out
        return self._generated_text(out, mask, isinstance(input, str))

    def _generated_text(self, out: torch.Tensor, mask: torch.Tensor | None,
                        single: bool) -> str | list[str]:
        """Each row's real tokens as text, without the BOS the model's rule put first."""
        model: Any = self
        bos = getattr(model.tokenizer, "bos_token_id", None)
        texts = []
        for i, row in enumerate(out):
            ids = row if mask is None else row[mask[i].bool()]
            if bos is not None and len(ids) and int(ids[0]) == bos:
                ids = ids[1:]
            texts.append(model.to_string(ids))
        return texts[0] if single else texts
