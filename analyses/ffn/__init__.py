"""FFN knowledge storage: where does a decoder keep what it knows?

Four methods, each a pure function of a model and data that returns tidy DataFrames (no files,
no plots; :mod:`analyses.app.sections.ffn` draws and writes):

- **Key-value memories** (Geva, Schuster, Berant and Levy 2021, "Transformer Feed-Forward
  Layers Are Key-Value Memories", EMNLP): every FFN neuron is a key (its input weights) that
  fires on textual patterns and a value (its row of ``W_out``) that promotes tokens.
  :func:`kv_memories` streams a corpus and keeps, per neuron, its top-k activating contexts in
  bounded running top-k tensors (:class:`TopKContexts`); projects every value vector through
  the unembedding to the tokens it promotes and suppresses; and measures, per layer, how
  often a value's top token is the next token of its key's top trigger context, against a
  neuron-shuffled baseline (Geva et al. Sec. 4).
- **Knowledge neurons** (Dai, Dong, Hao, Sui, Chang and Wei 2022, "Knowledge Neurons in
  Pretrained Transformers", ACL): :func:`integrated_gradients` attributes the answer
  probability to FFN intermediate activations (``mlp.hook_post``) at the prediction position,
  one layer at a time (zero baseline, Riemann sum batched over steps);
  :func:`knowledge_neurons` keeps neurons above 0.2 x the prompt's maximum attribution,
  refines them across paraphrases (kept by >= 70% of a fact's prompts), and drops neurons that
  other facts (with other answers) also select; :func:`edit_knowledge_neurons` suppresses
  (x0) or amplifies (x2) them and reports the relative change of the answer probability for
  the fact and for unrelated facts (specificity).
- **Causal tracing** (Meng, Bau, Andonian and Belinkov 2022, "Locating and Editing Factual
  Associations in GPT", NeurIPS): :func:`causal_trace` corrupts the subject's token
  embeddings with Gaussian noise (3 x the embeddings' standard deviation, several samples) or
  by replacing the subject with another one of the same token length (symmetric token
  replacement, Zhang and Nanda 2024, "Towards Best Practices of Activation Patching in
  Language Models: Metrics and Methods", ICLR), then restores the clean state at each
  (layer, position) for the residual stream, the MLP output and the attention output (MLP and
  attention over a window of layers around the centre, and MLP one layer alone beside it);
  the indirect effect is P(answer | restored) - P(answer | corrupted).
- **Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens", LessWrong):
  :func:`logit_lens` reads every layer's residual stream through the final norm and the
  unembedding: rank and probability of the answer, and KL(final || layer).

Facts are JSONL files (``prompt``, ``subject``, ``answer``, optional ``paraphrases`` and
``relation``; :func:`load_facts`); ``analyses/data/facts.jsonl`` ships 114 written for this
project. Models trained on ``knowledge`` (:mod:`interp.train`) bring their own facts
(:func:`facts_for_model`). Only facts the model gets right are analysed (:func:`known_facts`).

Speed: the restorations of one position run as one batch in which every row joins at its
first restored layer, from the cached corrupted stream (:mod:`analyses.ffn.stream`), and
compute only positions at or after the restored one, reading earlier positions' keys and
values from the corrupted run's KV cache (a causal model's earlier positions cannot change).
Integrated gradients likewise run only the prediction position from the attributed layer on,
every layer's Riemann steps in one such staggered batch. Under ``--nproc N`` facts, lens
batches and key-value memory layers are sharded over the ranks (:mod:`analyses.distributed`).

The package, in reading order: ``facts`` (the fact files and the default corpus), ``readout``
(model checks and next-token probabilities every method reads), ``prepare`` (facts tokenised
for a model, and which ones it knows), ``stream`` (rows that start at different layers, as one
batch), ``lens``, ``tracing``, ``neurons``, ``memories`` (one method each), ``pipeline`` (all
of them, as ``interp ffn`` runs them).

>>> import analyses.ffn as fk
>>> len(fk.load_facts(fk.default_facts_path())) >= 60
True
"""

from __future__ import annotations

from analyses.ffn.facts import (
    Fact,
    _task_name,
    default_corpus,
    default_facts_path,
    facts_for_model,
    load_facts,
)
from analyses.ffn.lens import logit_lens
from analyses.ffn.memories import (
    KVMemories,
    TopKContexts,
    corpus_batches,
    kv_memories,
    trigger_table,
)
from analyses.ffn.neurons import (
    DAI_AMPLIFY,
    DAI_SUPPRESS,
    IGResult,
    _scale_hook,
    edit_knowledge_neurons,
    integrated_gradients,
    knowledge_neurons,
    refined_neurons,
    summarize_edits,
)
from analyses.ffn.pipeline import PRODUCTS, analyse, resolve_products
from analyses.ffn.prepare import (
    PreparedFact,
    fact_predictions,
    known_facts,
    prepare_facts,
    select_facts,
)
from analyses.ffn.readout import _last_probs, _pad, check_model, dense_layers
from analyses.ffn.tracing import (
    POSITION_ROLES,
    TRACE_KINDS,
    _position_role,
    _replacements,
    _subject_embed_std,
    _traced_positions,
    _window_layers,
    average_trace,
    causal_trace,
    default_window,
)
from interp.progress import Progress

__all__ = [
    "DAI_AMPLIFY",
    "PRODUCTS",
    "DAI_SUPPRESS",
    "POSITION_ROLES",
    "TRACE_KINDS",
    "Fact",
    "IGResult",
    "KVMemories",
    "PreparedFact",
    "Progress",
    "TopKContexts",
    # private helpers the tests and the report section reach (re-exported, as before)
    "_last_probs",
    "_pad",
    "_position_role",
    "_replacements",
    "_scale_hook",
    "_subject_embed_std",
    "_task_name",
    "_traced_positions",
    "_window_layers",
    "analyse",
    "average_trace",
    "causal_trace",
    "check_model",
    "corpus_batches",
    "default_corpus",
    "default_facts_path",
    "default_window",
    "dense_layers",
    "edit_knowledge_neurons",
    "fact_predictions",
    "facts_for_model",
    "integrated_gradients",
    "known_facts",
    "knowledge_neurons",
    "kv_memories",
    "load_facts",
    "logit_lens",
    "prepare_facts",
    "refined_neurons",
    "resolve_products",
    "select_facts",
    "summarize_edits",
    "trigger_table",
]
