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
import torch

from analyses.ffn.facts import default_corpus, facts_for_model
from analyses.ffn.lens import logit_lens
from analyses.ffn.memories import KVMemories, corpus_batches, kv_memories, trigger_table
from analyses.ffn.neurons import edit_knowledge_neurons, knowledge_neurons, summarize_edits
from analyses.ffn.prepare import PreparedFact, known_facts, prepare_facts, select_facts
from analyses.ffn.readout import check_model
from analyses.ffn.tracing import average_trace, causal_trace, default_window
from interp import HookedTransformer
from interp.errors import InterpError
from interp.perf.kernels import bf16_products, bf16_products_native
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


#: How the costly methods multiply: float32, or bfloat16 products with float32 sums and a
#: float32 residual stream (:func:`interp.perf.kernels.bf16_products`).
PRODUCTS = ("float32", "bfloat16")
#: Narrower models keep float32 under ``auto``: their products are too small for bfloat16 to
#: gain anything over the cost of casting (measured in BENCHMARKS.md, "FFN throughput").
BF16_MIN_WIDTH = 512


def resolve_products(choice: str, model: HookedTransformer) -> str:
    """``auto`` -> ``bfloat16`` for a float32 model at least :data:`BF16_MIN_WIDTH` wide on a
    device that multiplies bfloat16 natively (AMX / AVX512-BF16 CPUs, CUDA), else
    ``float32``; an explicit choice is kept."""
    if choice != "auto":
        _products(choice)
        return choice
    p = next(model.parameters())
    native = p.dtype == torch.float32 and bf16_products_native(p.device)
    return "bfloat16" if native and model.cfg.d_model >= BF16_MIN_WIDTH else "float32"


def _products(products: str) -> contextlib.AbstractContextManager:
    """The block the costly methods (causal tracing, integrated gradients) run in."""
    if products not in PRODUCTS:
        raise InterpError(f"products must be one of auto, {', '.join(PRODUCTS)}, got "
                          f"{products!r}.")
    return bf16_products() if products == "bfloat16" else contextlib.nullcontext()


def _neurons_and_edits(model: HookedTransformer, chosen: list[PreparedFact],
                       known: list[PreparedFact], ig_steps: int, n_unrelated: int, seed: int,
                       progress: Progress, products: str = "float32",
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Knowledge neurons of the chosen facts, and their edits; unrelated facts are drawn from
    every known fact (only the analysed ones have neurons). Integrated gradients multiply as
    ``products`` says; the edits' effects are always measured in float32."""
    if not chosen:
        return pd.DataFrame(columns=KN_COLUMNS), pd.DataFrame()
    with _products(products):
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

    ``products="bfloat16"`` runs causal tracing and integrated gradients (~90% of the time on
    a real model) with bfloat16 matrix products and float32 sums, residual stream, norms and
    softmaxes (:func:`interp.perf.kernels.bf16_products`); which facts are known, the logit
    lens, the neuron edits and the key-value memories stay float32.
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
    kn, edits = _neurons_and_edits(model, chosen, known, ig_steps, n_unrelated, seed, progress,
                                   products)
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
