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
from analyses.circuits.pairs import PromptPairs
from analyses.circuits.runs import PairRuns
from analyses.circuits.sites import Kind, resolve, sites
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


def _full_shape(kind: Kind, shape: Sequence[int], T: int) -> tuple[int, ...]:
    """The activation's shape over the whole prompt: a suffix run holds fewer positions."""
    dims = kind.dims if kind.layered else ("pos",)
    return tuple(T if i < len(dims) and dims[i] == "pos" else n for i, n in enumerate(shape))


def _shift(kind: Kind, index: tuple, start: int) -> tuple | None:
    """A site's index into the suffix activation (positions ``start`` fewer); None for a
    position inside the shared prefix, where clean and corrupted are equal (a no-op patch)."""
    dims = kind.dims if kind.layered else ("pos",)
    out = list(index)
    for i, d in enumerate(dims):
        if d == "pos" and isinstance(out[i], int):
            if out[i] < start:
                return None
            out[i] -= start
    return tuple(out)


def _patched_run(runs: PairRuns, layer: int, hook: str, group: list[tuple], clean_act:
                 torch.Tensor, fn: Metric) -> torch.Tensor:
    """One forward of len(group) stacked corrupted copies, copy p patched at index group[p];
    the metric per site summed over the batch's pairs, [len(group)]."""
    P, b = len(group), runs.b
    B = b.clean.shape[0]

    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        v = x.view(P, B, *x.shape[1:])
        for p, index in enumerate(group):
            at = (slice(None), *index)
            v[p][at] = clean_act[at].to(x.dtype)
        return x

    logits = runs.run(P, layer, [(hook, patch)])
    rep = lambda t: t.repeat(P, *([1] * (t.ndim - 1)))  # noqa: E731
    m = fn(logits, rep(b.answer), rep(b.wrong), rep(runs.clean_last))
    return m.view(P, B).double().sum(1)


def _groups(n: int, per_forward: int) -> list[range]:
    """``n`` sites cut into the fewest forwards of at most ``per_forward``, sizes balanced
    (9 heads at 8 per forward: 5 + 4, not 8 + 1)."""
    k = -(-n // per_forward)
    size = -(-n // k) if k else 0
    return [range(s, min(n, s + size)) for s in range(0, n, size)] if n else []


# Long because it is the one streaming loop: per pair batch the shared runs, then per hook
# the sites in balanced groups, the no-op prefix sites, and the table.
@torch.inference_mode()
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

    A forward holds at most ``max_batch`` sequences (sites x pairs of the batch); the shared
    prefix and the blocks below each site run once per batch (:mod:`analyses.circuits.runs`).
    """
    fn = get_metric(metric)
    kind, hooks = resolve(model, what, layers)
    names = [h for _, h in hooks]
    base, sums = Baseline(), {}
    labels: dict[tuple, dict] = {}
    batches = list(pairs.batches(batch_size))
    for b in progress(batches, desc=f"patching {what}", total=len(batches)):
        b = b.to(model.device)
        runs = PairRuns(model, b, names, [x for x, _ in hooks], fast=kind.layered)
        cl = runs.clean_last
        m_corr = fn(runs.corr_last, b.answer, b.wrong, cl)
        base.add(fn(cl, b.answer, b.wrong, cl), m_corr)
        per_forward = max(1, max_batch // b.clean.shape[0])
        T = int(b.clean.shape[1])
        for layer, name in hooks:
            act = runs.clean[name]
            every = list(sites(kind, layer, name, _full_shape(kind, act.shape[1:], T),
                               positions))
            index = [_shift(kind, site.index, runs.start) for site in every]
            todo = [i for i, at in enumerate(index) if at is not None]
            values = [float(m_corr.double().sum())] * len(every)  # a no-op patch: corrupted
            for g in _groups(len(todo), per_forward):
                got = _patched_run(runs, layer, name, [index[todo[i]] for i in g], act, fn)
                for i, value in zip(g, got.tolist(), strict=True):
                    values[todo[i]] = value
            for site, value in zip(every, values, strict=True):
                key = (name, *site.labels.values())
                labels[key] = site.labels
                sums[key] = sums.get(key, 0.0) + value
        del runs
    m_clean, m_corr = base.means
    rows = [{**labels[k], "metric": v / base.n, "score": normalise(v / base.n, m_clean, m_corr)}
            for k, v in sums.items()]
    df = pd.DataFrame(rows)
    df.attrs.update(clean=m_clean, corrupted=m_corr, what=what, n_pairs=base.n)
    return df
