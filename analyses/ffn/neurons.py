"""Knowledge neurons (Dai, Dong, Hao, Sui, Chang and Wei 2022, "Knowledge Neurons in Pretrained
Transformers", ACL): which FFN neurons a fact depends on, and what editing them does.

:func:`integrated_gradients` attributes the answer probability to FFN intermediate activations
(``mlp.hook_post``) at the prediction position, one layer at a time (zero baseline, Riemann sum
batched over steps); :func:`knowledge_neurons` keeps neurons above 0.2 x the prompt's maximum
attribution, refines them across paraphrases (kept by >= 70% of a fact's prompts), and drops
neurons that other facts (with other answers) also select; :func:`edit_knowledge_neurons`
suppresses (x0) or amplifies (x2) them and reports the relative change of the answer probability
for the fact and for unrelated facts (specificity).

Integrated gradients run only the prediction position from the attributed layer on, reading
earlier positions' keys and values from a KV cache; every layer's Riemann steps run as one
staggered batch (:mod:`analyses.ffn.stream`), each row joining at its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from analyses import distributed
from analyses.ffn.prepare import PreparedFact
from analyses.ffn.readout import (
    FwdHook,
    _kv_rows,
    _unembed,
    answer_probs,
    check_model,
    dense_layers,
)
from analyses.ffn.stream import staggered_forward
from interp import HookedTransformer, KVCache
from interp.errors import InterpError
from interp.progress import Progress, no_progress

# Dai et al. 2022, Fig. 3/4: mean relative change of the correct answer's probability when
# their knowledge neurons are suppressed (-29.03%) or amplified (+31.17%), BERT-base.
DAI_SUPPRESS = -0.2903
DAI_AMPLIFY = 0.3117

#: Per fact, ``{(layer, neuron): (mean attribution, share of prompts)}`` (:func:`refined_neurons`).
Refined = list[dict[tuple[int, int], tuple[float, float]]]


@dataclass
class IGResult:
    """Integrated-gradients attributions of one prompt.

    ``attributions`` [n_layers, d_mlp] (rows of non-dense layers are zero); ``prob`` the
    answer's probability; ``baseline_probs`` [n_layers]: the probability with that layer's
    activations at the prediction position set to the baseline (zero). Completeness: row l
    sums to ``prob - baseline_probs[l]`` up to the Riemann error.
    """

    attributions: torch.Tensor
    prob: float
    baseline_probs: torch.Tensor
    layers: list[int] = field(default_factory=list)
    steps: torch.Tensor | None = None  # Riemann steps used per layer (doubled until complete)


# ------------------------------------------------------------------ integrated gradients
@torch.no_grad()
def _last_position_states(model: HookedTransformer, toks: torch.Tensor, answer_id: int,
                          layers: Sequence[int]) -> tuple[float, KVCache, dict[str, torch.Tensor]]:
    """One clean run: P(answer), the KV cache, and at the last position the stream entering
    every block and the FFN activations of ``layers``."""
    L = model.cfg.n_layers
    kv = KVCache(L)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    names += [f"blocks.{i}.mlp.hook_post" for i in layers]
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        store[hook.name] = act[:, -1:].detach()

    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        hidden = model(toks, past_kv=kv, return_type="hidden")
        prob = float(torch.softmax(_unembed(model, hidden[0, -1]), -1)[answer_id])
    return prob, kv, store


def _pass_through(act: torch.Tensor, hook: Any) -> None:
    """A hook that changes nothing (see :func:`_eager_attention_hooks`)."""


def _eager_attention_hooks(model: HookedTransformer) -> dict[int, list[FwdHook]]:
    """Per layer, a pass-through hook on ``attn.hook_pattern``, which makes the attention
    form its scores explicitly (a watched pattern must exist) instead of calling PyTorch's
    fused kernel. Why: integrated gradients differentiate rows of one query against a dozen
    keys, where the fused kernel's CPU backward costs 1.5 ms a call; the explicit scores' one
    is a few small products. SmolLM2, 9 prompts, alternating: 10.73 -> 10.24 s and 11.85 ->
    11.22 s, attributions equal to 6e-6. Softmax attention only (linear attention forms a
    pattern only when watched)."""
    if model.cfg.attn_kernel == "linear":
        return {}
    return {i: [(f"blocks.{i}.attn.hook_pattern", _pass_through)]
            for i, b in enumerate(model.blocks)
            if hasattr(getattr(b, "attn", None), "hook_pattern")}


def _staggered_grads(model: HookedTransformer, rows: list[tuple[int, int, float]],
                     store: dict[str, torch.Tensor], kv: KVCache, toks: torch.Tensor,
                     answer_id: int) -> tuple[torch.Tensor, list[tuple[int, int, int]],
                                              tuple[torch.Tensor, ...]]:
    """One staggered stream of ``rows`` ``(job, layer, alpha)`` sorted by layer: P(answer)
    per row, the runs ``(job, lo, hi)`` of consecutive rows of one job, and each run's
    dP/d(scaled activations) [hi - lo, d_mlp]."""
    T = toks.shape[1]
    runs: list[tuple[int, int, int, int]] = []  # (job, layer, lo, hi)
    for r, (j, layer, _) in enumerate(rows):
        if runs and runs[-1][0] == j:
            runs[-1] = (j, layer, runs[-1][2], r + 1)
        else:
            runs.append((j, layer, r, r + 1))
    scaled = []
    for _, layer, lo, hi in runs:
        alphas = torch.tensor([a for _, _, a in rows[lo:hi]], device=toks.device)
        post = store[f"blocks.{layer}.mlp.hook_post"][0, 0].float()
        scaled.append((alphas[:, None] * post[None]).detach().requires_grad_(True))
    joining = {layer: (lo, sc) for (_, layer, lo, _), sc in zip(runs, scaled, strict=True)}

    def entering(layer: int, lo: int, hi: int) -> torch.Tensor:
        return store[f"blocks.{layer}.hook_resid_pre"].expand(hi - lo, 1, -1)

    def replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
        lo, sc = joining[hook.layer()]  # rows joining at this layer are the batch's last
        return torch.cat([act[:lo], sc[:, None, :].to(act.dtype)])

    eager = _eager_attention_hooks(model)

    def hooks(layer: int, n: int) -> list[Any]:
        out = [(f"blocks.{layer}.mlp.hook_post", replace)] if layer in joining else []
        return out + eager.get(layer, [])

    def past(layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if T == 1:
            return None
        e = kv.layers[layer]
        return e.k[:, :T - 1].expand(n, -1, -1, -1), e.v[:, :T - 1].expand(n, -1, -1, -1)

    with torch.enable_grad():
        final = staggered_forward(model, [layer for _, layer, _ in rows],
                                  toks[:, -1:].expand(len(rows), 1), entering, past, hooks)[:, -1]
        # P(answer) and dP/d(final) outside autograd, in one reused vocabulary-wide buffer
        # (readout.answer_probs); autograd takes it from the final hidden state back
        p, g_final = answer_probs(model, final, answer_id, grads=True)
        grads = torch.autograd.grad(final, scaled, grad_outputs=g_final.to(final.dtype))
    return p, [(j, lo, hi) for j, _, lo, hi in runs], grads


def _probs_and_grads(model: HookedTransformer, jobs: Sequence[tuple[int, torch.Tensor]],
                     store: dict[str, torch.Tensor], kv: KVCache, toks: torch.Tensor,
                     answer_id: int, max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per job ``(layer, alphas)``: P(answer) [n] and dP/d(activations) [n, d_mlp] at
    activations alpha * post of ``layer`` (the last position only, from ``layer`` on, earlier
    positions from ``kv``). Every job's rows run in staggered streams of at most ``max_rows``
    rows (:func:`analyses.ffn.stream.staggered_forward`: a row joins at its layer)."""
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][0])
    flat = [(j, jobs[j][0], a) for j in order for a in jobs[j][1].tolist()]  # one per row
    ps: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(jobs))}
    gs: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(jobs))}
    for c in range(0, len(flat), max_rows):
        p, runs, grads = _staggered_grads(model, flat[c:c + max_rows], store, kv, toks,
                                          answer_id)
        for (j, lo, hi), g in zip(runs, grads, strict=True):
            ps[j].append(p[lo:hi])
            gs[j].append(g.float())
    return [(torch.cat(ps[j]), torch.cat(gs[j])) for j in range(len(jobs))]


def integrated_gradients(model: HookedTransformer, tokens: Sequence[int], answer_id: int, *,
                         layers: Sequence[int] | None = None, steps: int = 20,
                         rule: str = "midpoint", tolerance: float | None = 0.05,
                         max_steps: int = 160, batch_size: int = 512) -> IGResult:
    """Integrated gradients (Sundararajan et al. 2017) of P(answer) w.r.t. the FFN
    intermediate activations ``mlp.hook_post`` at the last position, as Dai et al. 2022
    (Sec. 3.1) do for knowledge attribution: layer by layer, the whole layer's activation
    vector is scaled from the zero baseline to its value, ``attr_i = a_i * mean_k
    dP(alpha_k a)/da_i``; the ``steps`` scalings run as one batch.

    ``rule``: ``midpoint`` (alpha_k = (k + 0.5)/m, error O(1/m^2)) or ``right`` (k/m, Dai et
    al.'s). Completeness is checked per layer: when the attributions miss ``P - P(baseline)``
    by more than ``tolerance`` (relative; differences below 1e-3 are not checked) the layer is
    recomputed with twice the steps, up to ``max_steps`` (``tolerance=None``: never). On
    SmolLM2, 20 steps leave layer 0 (whose removal takes P(answer) to ~0) 10-15% off.
    Only the last position is recomputed, from the attributed layer on, with earlier positions'
    keys and values from a KV cache (a causal model's earlier positions do not depend on it).
    """
    check_model(model)
    if rule not in ("midpoint", "right"):
        raise InterpError(f"rule must be 'midpoint' or 'right', got {rule!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"steps must be a positive integer, got {steps!r}.")
    L, dev = model.cfg.n_layers, model.device
    layers = dense_layers(model) if layers is None else list(layers)
    toks = torch.tensor([list(tokens)], device=dev)
    prob, kv, store = _last_position_states(model, toks, answer_id, layers)
    attributions = torch.zeros(L, model.cfg.d_mlp)
    baseline = torch.full((L,), prob)
    steps_used = torch.zeros(L, dtype=torch.long)
    # Every layer's first Riemann sum in one staggered batch, then the layers whose
    # attributions miss completeness again with twice the steps, until none does.
    pending = {layer: steps for layer in layers}
    while pending:
        jobs = []
        for layer, m in pending.items():
            k = torch.arange(m, dtype=torch.float32, device=dev)
            alphas = (k + 0.5) / m if rule == "midpoint" else (k + 1) / m
            if steps_used[layer] == 0:  # the alpha = 0 row gives the baseline's probability
                alphas = torch.cat([torch.zeros(1, device=dev), alphas])
            jobs.append((layer, alphas))
        again = {}
        for (layer, _), (p, g) in zip(jobs, _probs_and_grads(model, jobs, store, kv, toks,
                                                              answer_id, batch_size),
                                      strict=True):
            m = pending[layer]
            if steps_used[layer] == 0:
                baseline[layer] = float(p[0])
                g = g[1:]
            post = store[f"blocks.{layer}.mlp.hook_post"][0, 0].float()  # [d_mlp]
            attr = post * g.mean(0)
            steps_used[layer] = m
            attributions[layer] = attr.cpu()
            delta = prob - float(baseline[layer])
            err = abs(float(attr.sum()) - delta)
            if not (tolerance is None or abs(delta) < 1e-3 or err <= tolerance * abs(delta)
                    or 2 * m > max_steps):
                again[layer] = 2 * m
        pending = again
    return IGResult(attributions=attributions, prob=prob, baseline_probs=baseline, layers=layers,
                    steps=steps_used)


# ------------------------------------------------------------------ selection
def refined_neurons(model: HookedTransformer, facts: Sequence[PreparedFact], *, steps: int = 20,
                    threshold: float = 0.2, share: float = 0.7,
                    layers: Sequence[int] | None = None,
                    progress: Progress = no_progress) -> Refined:
    """Steps 1-2 of :func:`knowledge_neurons` per fact: ``{(layer, neuron): (mean attribution,
    share of prompts)}`` for neurons above ``threshold`` x max in at least ``share`` of
    prompts."""
    check_model(model)
    if not 0 < threshold <= 1 or not 0 < share <= 1:
        raise InterpError(f"threshold and share must be in (0, 1], got {threshold} and {share}.")
    local: dict[int, dict] = {}
    for i, f in enumerate(progress(facts, desc="knowledge neurons", total=len(facts))):
        if not distributed.mine(i):  # another rank's fact (analyses.distributed)
            continue
        prompts = f.prompts
        counts: dict[tuple[int, int], int] = {}
        attr_sum = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp)
        for toks in prompts:
            a = integrated_gradients(model, toks, f.answer_id, layers=layers,
                                     steps=steps).attributions
            attr_sum += a
            top = float(a.max())
            if top <= 0:
                continue
            for layer, neuron in (a > threshold * top).nonzero().tolist():
                counts[(layer, neuron)] = counts.get((layer, neuron), 0) + 1
        need = share * len(prompts) - 1e-9
        mean = attr_sum / len(prompts)
        local[i] = {k: (float(mean[k]), c / len(prompts)) for k, c in counts.items()
                    if c >= need}
    refined = distributed.gather_in_order(local, len(facts))
    return refined


def knowledge_neurons(model: HookedTransformer, facts: Sequence[PreparedFact], *,
                      steps: int = 20, threshold: float = 0.2, share: float = 0.7,
                      max_shared: int | None = 0, layers: Sequence[int] | None = None,
                      progress: Progress = no_progress,
                      refined: Refined | None = None) -> pd.DataFrame:
    """Knowledge neurons (Dai et al. 2022, Sec. 3.2) per fact.

    1. For each prompt of the fact (the prompt and its paraphrases): integrated gradients
       (:func:`integrated_gradients`); keep neurons with attribution > ``threshold`` x that
       prompt's maximum.
    2. Refine: keep neurons selected by at least ``share`` of the fact's prompts.
    3. Drop neurons that more than ``max_shared`` facts with a different answer also keep
       (``None``: keep all). Measured on SmolLM2 by the lead: single-prompt IG also picks
       generic neurons (last layer, layer 0) that unrelated facts share, so suppressing them
       hurts every fact; the paraphrase refinement and this filter make the selection specific.

    ``refined`` (from :func:`refined_neurons`) skips steps 1-2, to try several filters.
    Columns: ``fact, layer, neuron, attribution`` (mean over prompts), ``share`` (fraction of
    prompts selecting it), ``n_prompts, shared_with`` (facts with other answers that keep it
    too) and ``kept`` (the final knowledge neurons; ``kept=False`` rows were dropped by step 3).
    """
    if refined is None:
        refined = refined_neurons(model, facts, steps=steps, threshold=threshold, share=share,
                                  layers=layers, progress=progress)
    owners: dict[tuple[int, int], list[int]] = {}
    for i, sel in enumerate(refined):
        for key in sel:
            owners.setdefault(key, []).append(i)
    rows = []
    for i, (f, sel) in enumerate(zip(facts, refined, strict=True)):
        for (layer, neuron), (attr, frac) in sorted(sel.items()):
            shared = sum(1 for j in owners[(layer, neuron)]
                         if j != i and facts[j].answer_id != f.answer_id)
            rows.append({"fact": f.name, "layer": layer, "neuron": neuron, "attribution": attr,
                         "share": frac, "n_prompts": len(f.prompts), "shared_with": shared,
                         "kept": max_shared is None or shared <= max_shared})
    cols = ["fact", "layer", "neuron", "attribution", "share", "n_prompts", "shared_with", "kept"]
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------ editing
def _unrelated(facts: Sequence[PreparedFact], i: int, n: int, gen: torch.Generator) -> list[int]:
    """Facts with another subject and another answer (Dai et al.'s specificity control)."""
    f = facts[i]
    pool = [j for j, g in enumerate(facts)
            if j != i and g.answer_id != f.answer_id and g.subject != f.subject]
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[k] for k in order[:n]]


_EDIT_COLUMNS = ["fact", "mode", "target", "target_fact", "prompt", "p_before", "p_after",
                 "rel_change", "n_neurons"]


def _scale_hook(rows: torch.Tensor, last: torch.Tensor, neurons: torch.Tensor,
                factor: float) -> Callable:
    """A hook multiplying ``mlp.hook_post`` by ``factor`` at each pair ``(rows[i],
    neurons[i])``, at that row's last position ``last[rows[i]]``: one batch can edit a
    different set of neurons in every row."""
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        r = rows.to(act.device)
        act[r, last.to(act.device)[r], neurons.to(act.device)] *= factor
        return act
    return hook


def _edit_hooks(chunk: Sequence[dict[int, torch.Tensor]], last: torch.Tensor,
                factor: float) -> list[FwdHook]:
    """The hooks editing a batch whose row ``r`` scales neurons ``chunk[r][layer]``."""
    pairs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for r, per_layer in enumerate(chunk):
        for layer, idx in per_layer.items():
            rows, neurons = pairs.setdefault(layer, ([], []))
            rows.append(torch.full_like(idx, r))
            neurons.append(idx)
    return [(f"blocks.{layer}.mlp.hook_post",
             _scale_hook(torch.cat(rows), last, torch.cat(neurons), factor))
            for layer, (rows, neurons) in sorted(pairs.items())]


class _Prefixes:
    """Each distinct prompt's keys and values before its last token (prompts of one length
    in one cache), so the edits, which act at the prediction position only, recompute just
    that position: a causal model's earlier positions cannot see them."""

    def __init__(self, model: HookedTransformer, prompts: Sequence[tuple[int, ...]]) -> None:
        self.model = model
        self.row: dict[tuple[int, ...], int] = {}  # prompt -> its row in its length's cache
        self.caches: dict[int, KVCache | None] = {}
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for q in dict.fromkeys(prompts):
            by_len.setdefault(len(q), []).append(q)
        for T, qs in by_len.items():
            self.row.update((q, r) for r, q in enumerate(qs))
            cache = None
            if T > 1:
                cache = KVCache(model.cfg.n_layers)
                model(torch.tensor([q[:-1] for q in qs], device=model.device), past_kv=cache,
                      return_type="hidden")
            self.caches[T] = cache

    def probs(self, prompts: Sequence[tuple[int, ...]], answers: Sequence[int], batch_size: int,
              hooks: Callable[[list[int]], list[FwdHook]] | None = None) -> list[float]:
        """P(answer) at each prompt's last position, prompts of one length ``batch_size`` per
        forward; ``hooks(rows)`` gives the hooks of a batch of ``prompts[rows]``."""
        model, dev = self.model, self.model.device
        out = [0.0] * len(prompts)
        by_len: dict[int, list[int]] = {}
        for i, q in enumerate(prompts):
            by_len.setdefault(len(q), []).append(i)
        for T, idx in by_len.items():
            for s in range(0, len(idx), batch_size):
                rows = idx[s:s + batch_size]
                past = self.caches[T]
                if past is not None:
                    past = _kv_rows(past, torch.tensor([self.row[prompts[i]] for i in rows],
                                                       device=dev), T - 1)
                last = torch.tensor([[prompts[i][-1]] for i in rows], device=dev)
                with model.hooks(fwd_hooks=hooks(rows) if hooks else []):
                    hidden = model(last, past_kv=past, return_type="hidden")
                p = torch.softmax(_unembed(model, hidden[:, -1]), -1)
                p = p[torch.arange(len(rows)), torch.tensor([answers[i] for i in rows])]
                for i, v in zip(rows, p.tolist(), strict=True):
                    out[i] = v
        return out


@torch.no_grad()
def edit_knowledge_neurons(model: HookedTransformer, facts: Sequence[PreparedFact],
                           neurons: pd.DataFrame, *,
                           modes: Sequence[str] = ("suppress", "amplify"), n_unrelated: int = 10,
                           seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Suppress (activation x0) or amplify (x2) each fact's kept knowledge neurons at the
    prediction position (Dai et al. 2022, Sec. 4.2) and measure the answer probability on the
    fact's own prompts (``target="self"``) and on ``n_unrelated`` facts with other subjects
    and answers (``target="unrelated"``).

    Every fact's edited prompts run together, ``batch_size`` per forward, each row editing its
    own fact's neurons (one forward per fact and mode took most of the time: SmolLM2's 15
    facts x 13 prompts are 195 short rows), and only their last position runs, reading the
    earlier positions' keys and values from one cache per distinct prompt (:class:`_Prefixes`);
    the unedited probabilities are computed once per distinct prompt.

    Columns: ``fact, mode, target, target_fact, prompt, p_before, p_after, rel_change``
    ((after - before) / before), ``n_neurons``. Facts without kept neurons get no rows.
    """
    factor = {"suppress": 0.0, "amplify": 2.0}
    bad = [m for m in modes if m not in factor]
    if bad:
        raise InterpError(f"Unknown edit mode(s) {bad}; valid: suppress, amplify.")
    kept = neurons[neurons["kept"]] if "kept" in neurons else neurons
    by_fact = {name: g for name, g in kept.groupby("fact")}
    gen = torch.Generator().manual_seed(seed)
    jobs = []  # (fact, its kept neurons, targets (target, fact name, prompt, tokens, answer))
    for i, f in enumerate(facts):
        sel = by_fact.get(f.name)
        if sel is None or sel.empty:
            continue
        targets = [("self", f.name, k, tuple(toks), f.answer_id)
                   for k, toks in enumerate(f.prompts)]
        for j in _unrelated(facts, i, n_unrelated, gen):
            g = facts[j]
            targets.append(("unrelated", g.name, 0, tuple(g.tokens), g.answer_id))
        jobs.append((f, sel, targets))
    if not jobs:
        return pd.DataFrame(columns=_EDIT_COLUMNS)
    prefixes = _Prefixes(model, [t[3] for _, _, targets in jobs for t in targets])
    # unedited: once per distinct (prompt, answer)
    distinct = list(dict.fromkeys((t[3], t[4]) for _, _, targets in jobs for t in targets))
    p_before = dict(zip(distinct, prefixes.probs([q for q, _ in distinct],
                                                 [a for _, a in distinct], batch_size),
                        strict=True))
    # edited: every (fact, target) row, each with its fact's neurons per layer
    flat = [(k, t) for k, (_, _, targets) in enumerate(jobs) for t in targets]
    per_layer = [{int(layer): torch.tensor(g["neuron"].to_numpy(), dtype=torch.long)
                  for layer, g in sel.groupby("layer")} for _, sel, _ in jobs]
    p_after = {mode: prefixes.probs(
        [t[3] for _, t in flat], [t[4] for _, t in flat], batch_size,
        hooks=lambda rows, f=factor[mode]: _edit_hooks(
            [per_layer[flat[i][0]] for i in rows],
            torch.zeros(len(rows), dtype=torch.long, device=model.device), f))
        for mode in modes}
    rows = []
    start = 0
    for f, sel, targets in jobs:
        for mode in modes:
            for n, t in enumerate(targets):
                b, a = p_before[(t[3], t[4])], p_after[mode][start + n]
                rows.append({"fact": f.name, "mode": mode, "target": t[0], "target_fact": t[1],
                             "prompt": t[2], "p_before": b, "p_after": a,
                             "rel_change": (a - b) / b if b > 0 else float("nan"),
                             "n_neurons": len(sel)})
        start += len(targets)
    return pd.DataFrame(rows, columns=_EDIT_COLUMNS)


def summarize_edits(edits: pd.DataFrame) -> pd.DataFrame:
    """Mean relative change per (mode, target): each fact's prompts are averaged first, then
    facts (Dai et al. report the mean over facts). Also the mean absolute change and the
    number of facts."""
    if edits.empty:
        return pd.DataFrame(columns=["mode", "target", "mean_rel_change", "mean_abs_rel_change",
                                     "n_facts"])
    per_fact = (edits.assign(abs_rel=edits["rel_change"].abs())
                .groupby(["mode", "target", "fact"])[["rel_change", "abs_rel"]].mean())
    out = per_fact.groupby(["mode", "target"]).agg(mean_rel_change=("rel_change", "mean"),
                                                   mean_abs_rel_change=("abs_rel", "mean"),
                                                   n_facts=("rel_change", "count")).reset_index()
    return out
