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

Data-parallel (:mod:`analyses.distributed`): under ``torchrun`` or ``interp --nproc N`` each
rank patches every site on its round-robin share of the pair batches, and the per-site sums
and the pair counts are added over the ranks afterwards (:class:`SiteSums`,
:meth:`Baseline.reduce`), so the means are the one-process means, not averages of per-rank
averages. Outside a process group nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from analyses import distributed
from analyses.circuits.metrics import Metric, get_metric, normalise
from analyses.circuits.pairs import PairBatch, PromptPairs
from analyses.circuits.runs import PairRuns
from analyses.circuits.sites import Kind, resolve, sites
from interp.progress import Progress, no_progress

__all__ = ["Baseline", "SiteSums", "activation_patching", "baseline", "my_batches"]


class Baseline:
    """Per-pair metric sums of the clean and corrupted runs, streamed over batches, and
    optionally ``totals``, a fixed-shape float64 running sum the caller adds into (one value
    per sender, per edge), reduced with them in :meth:`reduce`."""

    def __init__(self, totals: torch.Tensor | None = None) -> None:
        self.clean = 0.0
        self.corrupted = 0.0
        self.n = 0
        self.totals = totals

    def add(self, m_clean: torch.Tensor, m_corr: torch.Tensor) -> None:
        self.clean += float(m_clean.double().sum())
        self.corrupted += float(m_corr.double().sum())
        self.n += int(m_clean.shape[0])

    def reduce(self) -> None:
        """Add the ranks' sums and pair counts (a no-op in one process)."""
        extra = ["totals"] if self.totals is not None else []
        distributed.reduce_sums(self, ["clean", "corrupted", "n", *extra])

    @property
    def means(self) -> tuple[float, float]:
        return self.clean / self.n, self.corrupted / self.n


class SiteSums:
    """A running metric sum per site, and the sites in the order one process meets them.

    One process inserts sites batch by batch, so a site first seen in a later batch (a
    position only longer pairs have) comes after the earlier batches' sites. Each rank sees
    only its share of the batches, so every site keeps where it was first met, ``(batch,
    its place within that batch)``; :meth:`merged` adds the ranks' sums and sorts by that, which is
    the one-process order. Sites are keyed, not a fixed tensor, because which sites exist
    depends on the pair lengths a rank happens to get, so the ranks' tables are gathered
    (``all_gather_object``) and added in rank order rather than reduced as one tensor.
    """

    def __init__(self) -> None:
        self.sums: dict[tuple, float] = {}
        self.labels: dict[tuple, dict] = {}
        self.first: dict[tuple, tuple[int, int]] = {}
        self._batch, self._seq = -1, 0

    def add(self, batch: int, key: tuple, labels: dict, value: float) -> None:
        """Add ``value`` (a sum over pair batch ``batch``'s pairs) to site ``key``."""
        if batch != self._batch:
            self._batch, self._seq = batch, 0
        if key not in self.sums:
            self.sums[key], self.labels[key] = 0.0, labels
            self.first[key] = (batch, self._seq)
        self._seq += 1
        self.sums[key] += value

    def merged(self) -> list[tuple[dict, float]]:
        """``(labels, sum over every rank's batches)`` per site, in the one-process order."""
        sums: dict[tuple, float] = {}
        labels: dict[tuple, dict] = {}
        first: dict[tuple, tuple[int, int]] = {}
        for part_sums, part_labels, part_first in distributed.gather_objects(
                (self.sums, self.labels, self.first)):
            for key, value in part_sums.items():
                sums[key] = sums.get(key, 0.0) + value
                labels.setdefault(key, part_labels[key])
                first[key] = min(first.get(key, part_first[key]), part_first[key])
        return [(labels[k], sums[k]) for k in sorted(sums, key=first.__getitem__)]


def my_batches(pairs: PromptPairs, batch_size: int) -> list[tuple[int, PairBatch]]:
    """``(index, batch)`` for this rank's round-robin share of the pair batches (all of them
    in one process); every rank builds the same batches, in the same order."""
    return [(i, b) for i, b in enumerate(pairs.batches(batch_size)) if distributed.mine(i)]


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].float()


@torch.no_grad()
def baseline(model, pairs: PromptPairs, metric: str | Metric = "logit_diff", *,
             batch_size: int = 8) -> tuple[float, float]:
    """Mean metric of the clean and of the corrupted prompts (over every rank's batches)."""
    fn, base = get_metric(metric), Baseline()
    for _, b in my_batches(pairs, batch_size):
        b = b.to(model.device)
        cl, co = _last(model(b.clean)), _last(model(b.corrupted))
        base.add(fn(cl, b.answer, b.wrong, cl), fn(co, b.answer, b.wrong, cl))
    base.reduce()
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
    In a distributed run each rank patches its share of the batches (:func:`my_batches`).
    """
    fn = get_metric(metric)
    kind, hooks = resolve(model, what, layers)
    names = [h for _, h in hooks]
    base, sums = Baseline(), SiteSums()
    batches = my_batches(pairs, batch_size)
    for i, b in progress(batches, desc=f"patching {what}", total=len(batches)):
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
            todo = [j for j, at in enumerate(index) if at is not None]
            values = [float(m_corr.double().sum())] * len(every)  # a no-op patch: corrupted
            for g in _groups(len(todo), per_forward):
                got = _patched_run(runs, layer, name, [index[todo[j]] for j in g], act, fn)
                for j, value in zip(g, got.tolist(), strict=True):
                    values[todo[j]] = value
            for site, value in zip(every, values, strict=True):
                sums.add(i, (name, *site.labels.values()), site.labels, value)
        del runs
    base.reduce()
    m_clean, m_corr = base.means
    rows = [{**labels, "metric": v / base.n, "score": normalise(v / base.n, m_clean, m_corr)}
            for labels, v in sums.merged()]
    df = pd.DataFrame(rows)
    df.attrs.update(clean=m_clean, corrupted=m_corr, what=what, n_pairs=base.n)
    return df
