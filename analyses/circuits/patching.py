"""Activation patching over a clean/corrupted prompt-pair set, many patches per forward.

For each site (see :mod:`analyses.circuits.sites`) the corrupted prompt is run with that
site's activation replaced by the clean run's, and the metric is read at the last position
(Meng et al. (2022), *Locating and Editing Factual Associations in GPT*, "causal tracing";
Wang et al. (2022), arXiv:2211.00593; Heimersheim and Nanda (2024), arXiv:2404.15255). A
large normalised score means the site carries what the clean prompt adds.

Batched: a group of P sites is one forward of P stacked copies of the corrupted batch, copy p
patched at site p only. Memory is bounded: pairs stream in batches of ``batch_size`` and only
the current batch's clean activations of the hooks being patched are held; a forward holds at
most ``max_batch`` sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from analyses.circuits.metrics import Metric, get_metric, normalise
from analyses.circuits.pairs import PairBatch, PromptPairs
from analyses.circuits.sites import Site, resolve, sites
from interp.progress import Progress, no_progress

__all__ = ["Baseline", "activation_patching", "baseline"]


class Baseline:
    """Per-pair metric sums of the clean and corrupted runs, streamed over batches."""

    def __init__(self) -> None:
        self.clean = 0.0
        self.corrupted = 0.0
        self.n = 0

    def add(self, m_clean: torch.Tensor, m_corr: torch.Tensor) -> None:
        self.clean += float(m_clean.double().sum())
        self.corrupted += float(m_corr.double().sum())
        self.n += int(m_clean.shape[0])

    @property
    def means(self) -> tuple[float, float]:
        return self.clean / self.n, self.corrupted / self.n


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float()


@torch.no_grad()
def baseline(model, pairs: PromptPairs, metric: str | Metric = "logit_diff", *,
             batch_size: int = 8) -> tuple[float, float]:
    """Mean metric of the clean and of the corrupted prompts."""
    fn, base = get_metric(metric), Baseline()
    for b in pairs.batches(batch_size):
        b = b.to(model.device)
        cl, co = _last(model(b.clean)), _last(model(b.corrupted))
        base.add(fn(cl, b.answer, b.wrong, cl), fn(co, b.answer, b.wrong, cl))
    return base.means


def _patched_run(model, b: PairBatch, group: list[Site], clean_act: torch.Tensor, fn: Metric,
                 clean_last: torch.Tensor) -> torch.Tensor:
    """One forward of len(group) stacked corrupted copies, copy p patched at site p; the
    metric per site summed over the batch's pairs, [len(group)]."""
    P, B = len(group), b.clean.shape[0]

    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        v = x.view(P, B, *x.shape[1:])
        for p, site in enumerate(group):
            at = (slice(None), *site.index)
            v[p][at] = clean_act[at].to(x.dtype)
        return x

    logits = model.run_with_hooks(b.corrupted.repeat(P, 1), fwd_hooks=[(group[0].hook, patch)])
    rep = lambda t: t.repeat(P, *([1] * (t.ndim - 1)))  # noqa: E731
    m = fn(_last(logits), rep(b.answer), rep(b.wrong), rep(clean_last))
    return m.view(P, B).double().sum(1)


@torch.no_grad()
def activation_patching(model, pairs: PromptPairs, what: str = "head", *,
                        metric: str | Metric = "logit_diff", layers: Sequence[int] | None = None,
                        positions: Sequence[int] | None = None, batch_size: int = 8,
                        max_batch: int = 128, progress: Progress = no_progress) -> pd.DataFrame:
    """Patch every site of ``what`` from clean into corrupted; one row per site.

    ``what`` is a kind (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
    ``mlp_out``, ``head``, ``head_pos``, ``q``, ``k``, ``v``, ``pattern``, ``neuron``) or a
    full hook name (patched per position). Columns: ``layer``, the kind's site columns
    (``pos``, ``head``, ``neuron``), ``metric`` (mean over pairs of the patched run's metric)
    and ``score`` (normalised: 0 = corrupted, 1 = clean). ``df.attrs`` holds ``clean`` and
    ``corrupted``, the unpatched means. Pairs of different lengths are fine for kinds without
    a ``pos`` column; with one, rows are per position index of each length group.
    """
    fn = get_metric(metric)
    kind, hooks = resolve(model, what, layers)
    names = [h for _, h in hooks]
    base, sums = Baseline(), {}
    labels: dict[tuple, dict] = {}
    batches = list(pairs.batches(batch_size))
    for b in progress(batches, desc=f"patching {what}", total=len(batches)):
        b = b.to(model.device)
        clean_logits, cache = model.run_with_cache(b.clean, names_filter=names)
        cl = _last(clean_logits)
        base.add(fn(cl, b.answer, b.wrong, cl),
                 fn(_last(model(b.corrupted)), b.answer, b.wrong, cl))
        per_forward = max(1, max_batch // b.clean.shape[0])
        for layer, name in hooks:
            act = cache[name]
            todo = list(sites(kind, layer, name, act.shape[1:], positions))
            for s in range(0, len(todo), per_forward):
                group = todo[s:s + per_forward]
                got = _patched_run(model, b, group, act, fn, cl)
                for site, value in zip(group, got.tolist(), strict=True):
                    key = (name, *site.labels.values())
                    labels[key] = site.labels
                    sums[key] = sums.get(key, 0.0) + value
        del cache
    m_clean, m_corr = base.means
    rows = [{**labels[k], "metric": v / base.n, "score": normalise(v / base.n, m_clean, m_corr)}
            for k, v in sums.items()]
    df = pd.DataFrame(rows)
    df.attrs.update(clean=m_clean, corrupted=m_corr, what=what, n_pairs=base.n)
    return df
