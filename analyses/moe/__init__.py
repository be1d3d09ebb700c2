"""MoE expert specialisation: what each expert does, each number against what chance looks like.

Streams a corpus batch by batch through a mixture-of-experts model, reads the router from the
hooks ``blocks.{l}.mlp.hook_router_logits`` [batch, pos, expert], ``hook_expert_indices`` and
``hook_expert_weights`` [batch, pos, top_k], and reduces each batch into fixed-size
accumulators (:class:`RoutingAccumulator`), so a ten times larger corpus costs ten times the
time and the same memory. Nothing here writes files or plots; :func:`routing_stats` and
:func:`expert_ablation` return tidy pandas DataFrames.

Metrics, per MoE layer, each with its baseline:

- **Load** (Shazeer et al. 2017; Fedus et al. 2021, Switch Transformers): share of tokens per
  expert as first choice and anywhere in the top-k, coefficient of variation and max/mean of
  the load (baseline: the CV of uniformly random assignment, ``sqrt((E-1)/n)``), router
  entropy per token and of the aggregate load (baseline: ``log E``, a router that does not
  discriminate).
- **Domain specialisation** (Jiang et al. 2024, Mixtral of Experts, sec. 5, fig. 7): the
  expert x domain distribution, normalised mutual information ``I(expert; domain)`` and a
  per-expert specialisation index, against the permutation baseline (domain labels shuffled
  over tokens) with a p-value. Shuffling labels keeps both margins of the expert x domain
  contingency table fixed, and a shuffled table is then exactly a random table with those
  margins (multivariate hypergeometric), so the null distribution is sampled from the margins
  alone (``scipy.stats.random_table``; Patefield 1981, Boyett 1979): no per-token pairs are
  stored and memory stays flat.
- **Token specialisation** (Xue et al. 2024, OpenMoE, sec. 4, "context-independent
  specialisation"): ``I(expert; token id)`` and the share of a token's occurrences that go to
  its most common expert, both against the same permutation baseline, which is the right
  chance level for tokens seen only a few times (a token seen once always has share 1).
- **Consecutive tokens** (Mixtral, sec. 5, table 5): how often tokens t and t+1 share the
  first-choice expert, and share any of their top-k experts, against the rate for independent
  assignments drawn from the measured load (first choice: exactly ``sum_e f_e^2``; top-k sets:
  all pairs of a uniform reservoir sample of routed tokens) and against a uniform router
  (``1/E``; ``1 - C(E-k, k)/C(E, k)``, 12.5% and 46% for Mixtral's 8 experts, top-2).
- **Cross-layer agreement**: NMI between the first-choice experts of every pair of MoE layers,
  with its permutation baseline.
- **Router margins**: the gap between the top-1 and top-2 routing weights, the logit gap at
  the top-k selection boundary, and how often either is a near tie, against routers whose
  logits are i.i.d. Gaussian with the measured per-token spread.
- **Expert ablation** (:func:`expert_ablation`): mask one expert with
  ``model.set_expert_mask`` (the router renormalises over the rest) and measure the loss change
  per domain; the expert whose removal hurts one domain most.

Normalised mutual information is ``I(X;Y) / min(H(X), H(Y))`` (Vinh, Epps and Bailey 2010,
"NMI_min"): it is 1 exactly when one variable determines the other, which is the question here
(does the token id determine the expert? does the expert determine the domain?); the adjusted
score ``(I - E_perm I) / (min H - E_perm I)`` (their AMI) removes the finite-sample bias.

The package, in reading order: ``inputs`` (models and batches accepted), ``stats`` (count
tables, permutation tests, chance levels), ``accumulator`` (the streamed counts), ``result``
(counts -> DataFrames), ``routing`` (:func:`routing_stats`: a model driven over a corpus),
``ablation`` (:func:`expert_ablation`, :func:`ablation_summary`), ``planted`` (ground-truth
model and class batches), ``text`` (text files as a domain stream).

>>> import torch
>>> from analyses.moe import class_batches, planted_router_model, routing_stats
>>> model, _ = planted_router_model(n_experts=4, d_vocab=32, seed=0)
>>> batches = class_batches(32, 4, n_batches=4, batch_size=4, seq_len=32, seed=0)
>>> res = routing_stats(model, batches, n_perm=50)
>>> float(res.summary["nmi_domain"].iloc[0]) > 0.95
True
"""

from __future__ import annotations

from analyses.moe.ablation import ablation_summary, expert_ablation
from analyses.moe.accumulator import RoutingAccumulator
from analyses.moe.inputs import moe_layers
from analyses.moe.planted import class_batches, planted_router_model
from analyses.moe.result import MoEResult
from analyses.moe.routing import routing_stats
from analyses.moe.stats import LN2, _mi, _perm_test, _random_tables
from analyses.moe.text import text_batches
from interp.progress import Progress

__all__ = [
    "LN2",
    "MoEResult",
    "Progress",
    "RoutingAccumulator",
    "_mi",
    "_perm_test",
    "_random_tables",
    "ablation_summary",
    "class_batches",
    "expert_ablation",
    "moe_layers",
    "planted_router_model",
    "routing_stats",
    "text_batches",
]
