"""Attribution patching: the first-order (gradient) approximation of activation patching.

For a site with activation a, patching clean into corrupted changes the metric by about
``(a_clean - a_corrupted) . dM/da`` at the corrupted run (Nanda (2023), *Attribution Patching:
Activation Patching At Industrial Scale*; Syed, Rager and Conmy (2023), *Attribution Patching
Outperforms Automated Circuit Discovery*, arXiv:2310.10348). Every site of every layer comes
from two forwards and one backward per batch, against one forward per site for
:func:`analyses.circuits.patching.activation_patching`, whose table it mirrors (same columns,
``score`` normalised the same way), so the two can be merged and correlated.

The edge version (Syed et al. sec. 3) scores a sender -> receiver edge by
``(out_sender_clean - out_sender_corrupted) . dM/d(in_receiver)``, where the receiver's input
is its own copy of the residual stream: a head's q/k/v input (``hook_q_input`` ...), an MLP's
``hook_mlp_in``, or the final residual read by the unembedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pandas as pd
import torch

from analyses.circuits.metrics import Metric, get_metric, normalise
from analyses.circuits.patching import Baseline, SiteSums, my_batches
from analyses.circuits.sites import resolve, sites
from interp.progress import Progress, no_progress

__all__ = ["attribution_patching", "edge_attribution_patching", "use_flags"]


@contextlib.contextmanager
def use_flags(model, **flags: bool) -> Iterator[None]:
    """Turn TransformerLens' opt-in hook points on (``attn_result``, ``split_qkv_input``,
    ``hook_mlp_in``) for the block, and restore the model's own settings after."""
    before = model.use_flags
    try:
        for name, on in flags.items():
            getattr(model, f"set_use_{name}")(on)
        yield
    finally:
        for name in flags:
            getattr(model, f"set_use_{name}")(before[f"use_{name}"])


def _corrupted_with_grads(model, b, names: list[str], fn: Metric, cl: torch.Tensor,
                          ) -> tuple[torch.Tensor, dict, dict]:
    """The corrupted forward keeping the activations at ``names``, and the gradients of the
    summed metric with respect to them."""
    kept: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        if not x.requires_grad:  # frozen weights: make the earliest activation a leaf
            x = x.detach().requires_grad_(True)
        kept[hook.name] = x
        return x

    with torch.enable_grad():
        logits = model.run_with_hooks(b.corrupted, fwd_hooks=[(n, keep) for n in names])
        m = fn(logits[:, -1].float(), b.answer, b.wrong, cl)
        grads = torch.autograd.grad(m.sum(), [kept[n] for n in names], allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(kept[n]))
             for n, g in zip(names, grads, strict=True)}
    return m.detach(), {n: t.detach() for n, t in kept.items()}, grads


def attribution_patching(model, pairs, what: str = "head", *, metric: str | Metric = "logit_diff",
                         layers: Sequence[int] | None = None, batch_size: int = 8,
                         progress: Progress = no_progress) -> pd.DataFrame:
    """The gradient estimate of :func:`activation_patching` for every site of ``what``.

    Same columns as activation patching (``layer``, site columns, ``metric`` = estimated mean
    metric of the patched run, ``score`` normalised); ``df.attrs`` has ``clean`` and
    ``corrupted``. In a distributed run each rank differentiates its share of the pair
    batches and the per-site sums are added over the ranks (:class:`SiteSums`).
    """
    fn = get_metric(metric)
    kind, hooks = resolve(model, what, layers)
    names = [h for _, h in hooks]
    base, sums = Baseline(), SiteSums()
    batches = my_batches(pairs, batch_size)
    for i, b in progress(batches, desc=f"attribution {what}", total=len(batches)):
        b = b.to(model.device)
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(b.clean, names_filter=names)
        cl = clean_logits[:, -1].float().detach()
        m_corr, corr, grads = _corrupted_with_grads(model, b, names, fn, cl)
        base.add(fn(cl, b.answer, b.wrong, cl), m_corr)
        for layer, name in hooks:
            prod = ((cache[name] - corr[name]) * grads[name]).double().sum(0)  # [*dims]
            for site in sites(kind, layer, name, prod.shape):
                sums.add(i, (name, *site.labels.values()), site.labels,
                         float(prod[site.index].sum()))
        del cache, corr, grads
    base.reduce()
    m_clean, m_corr = base.means
    rows = []
    for labels, v in sums.merged():
        est = m_corr + v / base.n
        rows.append({**labels, "metric": est, "score": normalise(est, m_clean, m_corr)})
    df = pd.DataFrame(rows)
    df.attrs.update(clean=m_clean, corrupted=m_corr, what=what, n_pairs=base.n)
    return df


def _nodes(model) -> tuple[list, list]:
    """Senders (name, order, hook, index into the hook's head dim or None) and receivers
    (name, order, hook, head index or None); a sender feeds a receiver of larger order."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    n_kv = model.cfg.n_kv_heads or H
    hd = model.hook_dict
    senders = [("embed", -1, "blocks.0.hook_resid_pre", None)]
    receivers = []
    for layer in range(L):
        senders += [(f"L{layer}H{h}", 2 * layer, f"blocks.{layer}.attn.hook_result", h)
                    for h in range(H)]
        for x, n in (("q", H), ("k", n_kv), ("v", n_kv)):
            receivers += [(f"L{layer}H{h}.{x}", 2 * layer, f"blocks.{layer}.hook_{x}_input", h)
                          for h in range(n)]
        if f"blocks.{layer}.hook_mlp_out" in hd and f"blocks.{layer}.hook_mlp_in" in hd:
            senders.append((f"MLP{layer}", 2 * layer + 1, f"blocks.{layer}.hook_mlp_out", None))
            receivers.append((f"MLP{layer}", 2 * layer + 1, f"blocks.{layer}.hook_mlp_in", None))
    receivers.append(("logits", 2 * L, f"blocks.{L - 1}.hook_resid_post", None))
    return senders, receivers


def _stack(acts: dict, nodes: list) -> torch.Tensor:
    """[batch, pos, node, d_model] of the nodes' vectors."""
    out = []
    for _, _, hook, idx in nodes:
        t = acts[hook]
        out.append(t[:, :, idx] if idx is not None else t)
    return torch.stack(out, 2)


# Long because it is one pass: flags, two forwards and a backward per batch, then the table.
def edge_attribution_patching(model, pairs, *, metric: str | Metric = "logit_diff",
                              batch_size: int = 8, progress: Progress = no_progress,
                              ) -> pd.DataFrame:
    """Edge attribution patching (Syed et al. 2023) for every sender -> receiver edge.

    Senders: ``embed`` (the embeddings' sum), each head's output ``LlHh`` and each MLP's output
    ``MLPl``; receivers: each head's q, k and v input (``LlHh.q``), each MLP's input and
    ``logits``. Columns ``sender``, ``receiver``, ``attribution`` (mean over pairs of the
    estimated metric change) and ``score`` (normalised by clean - corrupted). Needs a model
    whose blocks read a residual stream (a pre-norm decoder; not parallel attention/MLP).
    In a distributed run each rank takes its share of the pair batches and the edge sums are
    all-reduced.
    """
    fn = get_metric(metric)
    senders, receivers = _nodes(model)
    s_hooks = sorted({n[2] for n in senders})
    r_hooks = sorted({n[2] for n in receivers})
    base = Baseline(torch.zeros(len(senders), len(receivers), dtype=torch.float64,
                                device=model.device))
    batches = [b for _, b in my_batches(pairs, batch_size)]
    with use_flags(model, attn_result=True, split_qkv_input=True, hook_mlp_in=True):
        for b in progress(batches, desc="edge attribution", total=len(batches)):
            b = b.to(model.device)
            with torch.no_grad():
                clean_logits, cache = model.run_with_cache(b.clean, names_filter=s_hooks)
            cl = clean_logits[:, -1].float().detach()
            names = sorted(set(s_hooks) | set(r_hooks))
            m_corr, corr, grads = _corrupted_with_grads(model, b, names, fn, cl)
            base.add(fn(cl, b.answer, b.wrong, cl), m_corr)
            delta = _stack(cache.cache_dict, senders) - _stack(corr, senders)
            g = _stack(grads, receivers)
            base.totals += torch.einsum("bpsd,bprd->sr", delta.double(), g.double())
            del cache, corr, grads
    base.reduce()
    total = base.totals
    m_clean, m_corr = base.means
    rows = []
    for i, (s_name, s_ord, _, _) in enumerate(senders):
        for j, (r_name, r_ord, _, _) in enumerate(receivers):
            if s_ord < r_ord:
                a = float(total[i, j]) / base.n
                rows.append({"sender": s_name, "receiver": r_name, "attribution": a,
                             "score": a / (m_clean - m_corr)})
    df = pd.DataFrame(rows)
    df.attrs.update(clean=m_clean, corrupted=m_corr, n_pairs=base.n)
    return df
