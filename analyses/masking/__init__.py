"""Masking effects: what a model computes when it may see less, or keeps fewer heads or experts.

Three families of intervention on the *same weights*, each measured against the model's own
unmodified run:

1. **Attention and token masks** (:func:`compare_strategies`). The model's own mask (causal for
   decoders, bidirectional for encoders) against the other one, sliding windows (Beltagy et al.
   2020), a prefix-LM mask (Raffel et al. 2020, sec. 3.2.1), block-local and strided sparse
   patterns (Child et al. 2019), soft masks that put a finite penalty on masked scores instead
   of -inf, attention temperatures, and BERT-style token masking (Devlin et al. 2019: [MASK] at
   15%). Per strategy: output KL to the baseline, loss change, per-head Jensen-Shannon divergence
   of the attention patterns, entropy and mean attention distance shifts, the heads that move
   most. A soft mask with penalty ``p`` interpolates between "no mask" (``p = 0``) and the hard
   mask (``p -> inf``), so its KL to the hard mask must fall monotonically to 0 as ``p`` grows.
2. **Head masking** (Michel, Levy and Neubig 2019, *Are Sixteen Heads Really Better than One?*,
   NeurIPS). Gates ``xi_h`` multiply each head's output (``model.set_head_gates``); the
   importance is ``I_h = E_x |dL(x)/dxi_h|`` with the absolute value inside the expectation, per
   sequence (their eq. 2). The absolute value of the batch mean, ``|E_x dL/dxi_h|``, is a
   different and much weaker quantity: gradients of opposite sign on different sequences cancel.
   We report it as ``abs_mean_gradient`` for comparison, and the signed first-order Taylor
   estimate of the loss change when the head is removed, ``-E_x dL/dxi_h``
   (``predicted_delta``). Single-head zero and mean ablation measure the real effect; pruning
   curves remove heads in increasing importance order and in random orders.
3. **Expert masking** for mixture-of-experts models: the same, with a gate on each expert's
   routed weight for importance and ``model.set_expert_mask`` (the router renormalises over the
   remaining experts) for ablation and pruning.

The package, in reading order: ``strategies`` (what can be masked), ``data`` (text, labels,
loss), ``divergence`` (strategies against the baseline), ``removal`` (heads and experts out for
a while), ``importance`` (gate gradients), ``ablation`` (single units), ``pruning`` (curves).

Everything streams over batches with running sums: memory is one batch's activations (for the
strategies, one batch's baseline attention patterns, ``n_layers x batch x heads x pos^2``
floats), whatever the corpus size. Functions return tidy DataFrames; they never plot or write.

>>> import torch, interp
>>> from analyses import masking
>>> cfg = interp.ModelConfig(n_layers=1, d_model=32, n_heads=2, d_vocab=50, n_ctx=16)
>>> model = interp.HookedTransformer(cfg)
>>> batches = [torch.randint(0, 50, (2, 8))]
>>> s = masking.parse_strategies(["causal", "soft:4"], model.cfg.mask, seq_len=8)
>>> table, heads = masking.compare_strategies(model, batches, s)
>>> float(table.set_index("strategy").loc["causal", "kl"])
0.0
"""

from __future__ import annotations

from analyses.masking.ablation import expert_ablation, head_ablation, head_means
from analyses.masking.data import (
    LossBatch,
    _token_mask,
    has_loss,
    load_sample_text,
    loss_batches,
    mean_loss,
    replacement_token,
    text_to_batches,
)
from analyses.masking.divergence import compare_strategies
from analyses.masking.importance import expert_importance, head_importance
from analyses.masking.pruning import (
    expert_pruning_curves,
    head_pruning_curves,
    importance_correlations,
    max_removable,
)
from analyses.masking.removal import Unit
from analyses.masking.strategies import (
    DEFAULT_PARAMETERS,
    STRATEGY_NAMES,
    Strategy,
    default_strategy_specs,
    make_strategy,
    parse_strategies,
)
from interp.progress import Progress

__all__ = [
    "DEFAULT_PARAMETERS",
    "STRATEGY_NAMES",
    "LossBatch",
    "Progress",
    "Strategy",
    "Unit",
    "_token_mask",
    "compare_strategies",
    "default_strategy_specs",
    "expert_ablation",
    "expert_importance",
    "expert_pruning_curves",
    "has_loss",
    "head_ablation",
    "head_importance",
    "head_means",
    "head_pruning_curves",
    "importance_correlations",
    "load_sample_text",
    "loss_batches",
    "make_strategy",
    "max_removable",
    "mean_loss",
    "parse_strategies",
    "replacement_token",
    "text_to_batches",
]
