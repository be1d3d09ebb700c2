"""Driving a model: stream a corpus through it and read its routers into the accumulator.

One forward pass per batch keeps only the router hooks of the MoE layers (and stops after the
last one); the hook tensors go straight into a :class:`RoutingAccumulator`, so memory is one
batch's activations plus the fixed-size counts, whatever the corpus length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from analyses import distributed
from analyses.moe.accumulator import RoutingAccumulator
from analyses.moe.inputs import _as_batch, moe_layers
from analyses.moe.result import MoEResult
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress, no_progress

__all__ = ["routing_stats"]

_HOOKS = ("hook_router_logits", "hook_expert_indices", "hook_expert_weights")


def _capture(model: HookedTransformer, layers: Sequence[int], tokens: torch.Tensor,
             mask: torch.Tensor | None) -> dict:
    """One forward pass that keeps only the router hooks of ``layers`` (stops after the last)."""
    got: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any) -> None:
        got[hook.name] = t.detach()

    names = [f"blocks.{layer}.mlp.{h}" for layer in layers for h in _HOOKS]
    stop = max(layers) + 1
    kwargs: dict[str, Any] = {"return_type": None}
    if stop < model.cfg.n_layers:
        kwargs["stop_at_layer"] = stop
    with torch.inference_mode():
        model.run_with_hooks(tokens.to(model.device),
                             attention_mask=None if mask is None else mask.long().to(model.device),
                             fwd_hooks=[(name, keep) for name in names], **kwargs)
    return got


def _check_ids(tokens: torch.Tensor, n_ctx: int, d_vocab: int) -> None:
    """Sequences the model can read: at most ``n_ctx`` long, ids inside its vocabulary."""
    if tokens.shape[1] > n_ctx:
        raise InterpError(f"Sequences of {tokens.shape[1]} tokens exceed the model's "
                          f"n_ctx={n_ctx}; chunk the corpus into shorter sequences.")
    if int(tokens.max()) >= d_vocab or int(tokens.min()) < 0:
        raise InterpError(f"Token ids must lie in 0..{d_vocab - 1} for this model's vocabulary.")


def _token_names(model: HookedTransformer) -> Callable[[int], str] | None:
    """Token id -> its string, when the model's tokenizer can say."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return None

    def names(i: int) -> str:
        return str(tok.convert_ids_to_tokens(i))

    return names


def _merge_ranks(acc: RoutingAccumulator, peak: int) -> tuple[RoutingAccumulator, int]:
    """Every rank's counts merged in rank order (:meth:`RoutingAccumulator.merge`: sums, the
    sparse token x expert table, the reservoir of smallest keys), the same on every rank, and
    the peak accumulator size (the merged one's, as one process would hold). A plain run:
    ``acc`` and ``peak`` as they are."""
    if distributed.world().size == 1:
        return acc, peak
    acc.gen = None  # not picklable; the permutation nulls are drawn later from ``seed``
    acc._top1.clear()
    parts = distributed.gather_objects(acc)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    return merged, max(peak, merged.nbytes())


def routing_stats(model: HookedTransformer, batches: Iterable[Any], *,
                  domain_names: Sequence[str] | None = None, n_perm: int = 200,
                  min_token_count: int = 5, max_tokens: int | None = None,
                  reservoir: int = 2048, tie_weight: float = 0.05, tie_logit: float = 0.1,
                  seed: int = 0, progress: Progress | None = None,
                  total: int | None = None) -> MoEResult:
    """Stream ``batches`` through ``model`` and measure routing in every MoE layer.

    ``batches`` yields token tensors [batch, pos], or ``(tokens, domain_ids[, attention_mask])``
    with domain ids per sequence [batch] or per token [batch, pos] (-1 = unlabelled), or dicts
    (see :func:`analyses.moe.inputs._as_batch`). ``domain_names[i]`` names domain id i.
    ``n_perm`` permuted tables per test (p-values are ``(1 + #null >= observed) / (1 +
    n_perm)``); ``min_token_count`` excludes rarer tokens from the token statistics (their
    shares are trivially high; the permutation baseline covers the rest of that bias).
    ``max_tokens`` stops early. Under a process group (torchrun, ``interp --nproc``) each
    rank routes every ``size``-th batch and the accumulators are merged before any statistic
    or permutation null is computed (:mod:`analyses.distributed`): the one-process numbers.

    Frames of the :class:`MoEResult`:

    - ``load``: layer, expert, tokens_top1, tokens_topk, share_top1, share_topk (top-k
      assignments / (k * tokens)), mean_router_prob, uniform (= 1/E).
    - ``domain``: layer, expert, domain, tokens (top-k assignments), share (= P(expert in top-k
      | domain) / k, sums to 1 over experts, Mixtral fig. 7), share_top1 (P(first = expert |
      domain)), lift (P(domain | expert) / P(domain), first choice), uniform.
    - ``experts``: layer, expert, tokens_top1, top_domain (highest lift), top_domain_share,
      top_domain_lift, spec_index_bits (KL(P(domain | expert) || P(domain)); MI is its
      load-weighted mean), spec_index_baseline (its permutation mean), p_value.
    - ``tokens``: layer, token, token_str, count, top_expert, top_share (every token seen).
    - ``summary`` (one row per layer): n_tokens, cv_top1, cv_topk, cv_random,
      max_over_mean_topk, router_entropy (mean per-token entropy / log E), load_entropy,
      router_prob_entropy, entropy_uniform; nmi_domain, nmi_domain_baseline, nmi_domain_p95,
      p_value, ami_domain, mi_domain_bits, n_domains; nmi_token, nmi_token_baseline,
      token_p_value, ami_token, top_expert_share, top_expert_share_baseline, token_types,
      token_types_counted; consecutive_same_top1, consecutive_random (sum f^2),
      consecutive_uniform (1/E), consecutive_overlap_topk, consecutive_overlap_random,
      consecutive_overlap_uniform, n_pairs; margin_top12, near_tie_top12 (w1 - w2 <
      tie_weight), logit_gap_topk, near_tie_topk (gap < tie_logit), each with ``_baseline``
      (i.i.d. Gaussian logits of the same spread).
    - ``cross_layer``: layer_a, layer_b, nmi, nmi_baseline, p_value, same_expert_rate.
    """
    layers = moe_layers(model)
    cfg = model.cfg
    acc = RoutingAccumulator(layers, cfg.n_experts, cfg.experts_per_token, reservoir=reservoir,
                             tie_weight=tie_weight, tie_logit=tie_logit, seed=seed,
                             renormalized=cfg.router_renormalize or cfg.router == "topk_softmax")
    progress = progress or no_progress
    seen = 0
    peak = 0
    was_training = model.training
    model.eval()
    try:
        for i, item in enumerate(progress(batches, desc="routing", total=total)):
            tokens, domains, mask = _as_batch(item)
            if max_tokens is not None and seen >= max_tokens:
                break
            _check_ids(tokens, cfg.n_ctx, cfg.d_vocab)
            valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
            if not distributed.mine(i):  # another rank's batch (analyses.distributed)
                acc.skip(valid)
                seen += int(valid.sum())
                continue
            got = _capture(model, layers, tokens, mask)
            for layer in layers:
                pre = f"blocks.{layer}.mlp."
                acc.update(layer, *(got[pre + h] for h in _HOOKS), tokens, domains, valid)
            acc.end_batch()
            seen += int(valid.sum())
            peak = max(peak, acc.nbytes())
    finally:
        model.train(was_training)
    if seen == 0:
        raise InterpError("The corpus gave no tokens; give the MoE analysis some text or a "
                          "domain stream.")
    acc, peak = _merge_ranks(acc, peak)
    res = acc.result(domain_names=domain_names, token_names=_token_names(model), n_perm=n_perm,
                     min_token_count=min_token_count, seed=seed)
    res.peak_accumulator_bytes = peak
    return res
