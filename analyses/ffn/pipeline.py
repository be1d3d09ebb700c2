"""Every FFN knowledge method at once, on the facts a model knows: what ``interp ffn`` runs.

:func:`analyse` tokenises the facts, keeps those the model gets right, picks up to
``max_facts`` of them, and runs the logit lens, causal tracing, knowledge neurons (with their
edits) and key-value memories on them, timing each; the report section
(:mod:`analyses.app.sections.ffn`) draws and writes the frames it returns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from analyses.ffn.facts import default_corpus, facts_for_model
from analyses.ffn.lens import logit_lens
from analyses.ffn.memories import KVMemories, corpus_batches, kv_memories, trigger_table
from analyses.ffn.neurons import edit_knowledge_neurons, knowledge_neurons, summarize_edits
from analyses.ffn.prepare import PreparedFact, known_facts, prepare_facts, select_facts
from analyses.ffn.readout import check_model
from analyses.ffn.tracing import average_trace, causal_trace, default_window
from interp import HookedTransformer
from interp.errors import InterpError
from interp.perf.kernels import bf16_products
from interp.progress import Progress, no_progress

KN_COLUMNS = ["fact", "layer", "neuron", "attribution", "share", "n_prompts", "shared_with",
              "kept"]


def _detail_neurons(kn: pd.DataFrame, kv: KVMemories, n: int) -> list[tuple[int, int]]:
    """The neurons whose trigger contexts the report lists: the ``n`` strongest knowledge
    neurons, filled up with the strongest-firing neurons of the last analysed layer."""
    detail = []
    if not kn.empty:
        best = (kn[kn["kept"]].sort_values("attribution", ascending=False)
                .drop_duplicates(["layer", "neuron"]))
        detail = [(int(r.layer), int(r.neuron)) for r in best.head(n).itertuples()]
    if len(detail) < n:  # fill with the strongest-firing neurons of the last layer
        last = (kv.neurons[kv.neurons["layer"] == kv.neurons["layer"].max()]
                .sort_values("max_activation", ascending=False))
        detail += [(int(r.layer), int(r.neuron)) for r in last.head(n - len(detail)).itertuples()]
    return detail


#: How causal tracing multiplies: float32, or bfloat16 products with float32 sums and a
#: float32 residual stream (:func:`interp.perf.kernels.bf16_products`).
PRODUCTS = ("float32", "bfloat16")


def _products(products: str) -> contextlib.AbstractContextManager:
    """The block causal tracing runs in."""
    if products not in PRODUCTS:
        raise InterpError(f"products must be one of {', '.join(PRODUCTS)}, got {products!r}.")
    return bf16_products() if products == "bfloat16" else contextlib.nullcontext()


def _neurons_and_edits(model: HookedTransformer, chosen: list[PreparedFact],
                       known: list[PreparedFact], ig_steps: int, n_unrelated: int, seed: int,
                       progress: Progress) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Knowledge neurons of the chosen facts, and their edits; unrelated facts are drawn from
    every known fact (only the analysed ones have neurons)."""
    if not chosen:
        return pd.DataFrame(columns=KN_COLUMNS), pd.DataFrame()
    kn = knowledge_neurons(model, chosen, steps=ig_steps, progress=progress)
    edits = edit_knowledge_neurons(model, known if len(known) > len(chosen) else chosen, kn,
                                   n_unrelated=n_unrelated, seed=seed)
    return kn, edits


def analyse(model: HookedTransformer, facts: Sequence[Any] | None = None,
            texts: Sequence[str] | None = None, *, max_facts: int | None = 20,
            n_samples: int = 3, n_replacements: int | None = None, window: int | None = None,
            positions: str = "roles", ig_steps: int = 20, kv_layers: Sequence[int] | None = None,
            top_k: int = 25, batch_size: int = 8, max_tokens: int | None = None,
            n_unrelated: int = 10, n_detail_neurons: int = 6, seed: int = 0,
            products: str = "float32", progress: Progress = no_progress) -> dict[str, Any]:
    """Run every method on up to ``max_facts`` known facts; return the frames and timings.

    Keys: ``predictions`` (every fact), ``facts`` (analysed), ``logit_lens``, ``causal_trace``,
    ``trace_average``, ``knowledge_neurons``, ``edits``, ``edit_summary``, ``kv_memories``,
    ``kv_agreement``, ``kv_triggers``, ``timings`` (seconds per method), ``n_facts``,
    ``n_known``, ``window``.

    ``products="bfloat16"`` runs causal tracing (~60% of the time on SmolLM2) with bfloat16
    matrix products and float32 sums, residual stream, norms and softmaxes
    (:func:`interp.perf.kernels.bf16_products`): 1.8x faster on an AMX CPU, but SmolLM2's
    answer probabilities move by up to ~0.02, so it is opt-in. Integrated gradients stay
    float32: at bfloat16 precision their completeness check fails for most layers, and the
    step doubling it triggers makes them 4.5x slower, not faster (BENCHMARKS.md).
    """
    check_model(model)
    _products(products)  # a bad value fails before any work
    raw = list(facts) if facts is not None else facts_for_model(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepared = prepare_facts(model, raw)
    known, predictions = known_facts(model, prepared)
    chosen = select_facts(known, max_facts, seed)
    timings["known_facts"] = time.perf_counter() - t
    out: dict[str, Any] = {
        "predictions": predictions, "facts": chosen, "n_facts": len(prepared),
        "n_known": len(known),
        "window": default_window(model.cfg.n_layers) if window is None else window}
    t = time.perf_counter()
    out["logit_lens"] = logit_lens(model, chosen) if chosen else pd.DataFrame()
    timings["logit_lens"] = time.perf_counter() - t
    t = time.perf_counter()
    with _products(products):
        trace = causal_trace(model, chosen, n_samples=n_samples, n_replacements=n_replacements,
                             window=window, positions=positions, seed=seed,
                             subject_pool=prepared, progress=progress) if chosen else pd.DataFrame()
    out["causal_trace"], out["trace_average"] = trace, average_trace(trace)
    timings["causal_tracing"] = time.perf_counter() - t
    t = time.perf_counter()
    kn, edits = _neurons_and_edits(model, chosen, known, ig_steps, n_unrelated, seed, progress)
    out["knowledge_neurons"], out["edits"], out["edit_summary"] = kn, edits, summarize_edits(edits)
    timings["knowledge_neurons"] = time.perf_counter() - t
    t = time.perf_counter()
    corpus = list(texts) if texts is not None else default_corpus(model, raw)
    kv = kv_memories(model, corpus_batches(model, corpus, batch_size=batch_size,
                                           max_tokens=max_tokens),
                     layers=kv_layers, top_k=top_k, seed=seed, progress=progress)
    out["kv_memories"], out["kv_agreement"] = kv.neurons, kv.agreement
    out["kv_triggers"] = trigger_table(model, kv, _detail_neurons(kn, kv, n_detail_neurons))
    out["kv_tokens"] = kv.store.n_tokens
    timings["kv_memories"] = time.perf_counter() - t
    out["timings"], out["products"] = timings, products
    return out
