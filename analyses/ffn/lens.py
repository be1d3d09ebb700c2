"""Logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens", LessWrong).

Every layer's residual stream at the prediction position is read through the final norm and
the unembedding, as if the model stopped there: how early the answer becomes the top token, and
how far each layer's distribution still is from the final one. Under ``--nproc N`` each rank
reads its share of the batches of facts (:mod:`analyses.distributed`; the batches are the
one-process ones, so the numbers are too).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from analyses import distributed
from analyses.ffn.prepare import PreparedFact
from analyses.ffn.readout import _final_norm, _pad, _token_str, _unembed, check_model
from interp import HookedTransformer, tokenize


@torch.no_grad()
def logit_lens(model: HookedTransformer, facts: Sequence[PreparedFact],
               batch_size: int = 16) -> pd.DataFrame:
    """Logit lens (nostalgebraist 2020): each layer's residual stream at the prediction
    position, read through the final norm and the unembedding.

    Columns: ``fact, layer`` (-1 = the embeddings, l = after block l), ``answer_prob``,
    ``answer_rank`` (1 = top), ``kl_to_final`` (KL(final || layer) in nats), ``top_token``.
    """
    check_model(model)
    L = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    local: dict[int, list[dict]] = {}
    for c, s in enumerate(range(0, len(facts), batch_size)):
        if not distributed.mine(c):  # another rank's batch (analyses.distributed)
            continue
        rows = local[c] = []
        chunk = facts[s:s + batch_size]
        tokens, mask, last = _pad([f.tokens for f in chunk], tokenize.pad_id(model), model.device)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=None,
                                        names_filter=lambda n: n in names)
        idx = torch.arange(len(chunk))
        stack = torch.stack([cache[n][idx, last] for n in names])  # [L+1, batch, d_model]
        # [L+1, batch, vocab]
        logp = torch.log_softmax(_unembed(model, _final_norm(model, stack)), -1)
        final = logp[-1]
        kl = (final.exp() * (final - logp)).sum(-1)  # [L+1, batch]
        for b, f in enumerate(chunk):
            lp = logp[:, b]
            ans = lp[:, f.answer_id]
            ranks = (lp > ans[:, None]).sum(-1) + 1
            tops = lp.argmax(-1)
            for layer in range(L + 1):
                rows.append({"fact": f.name, "layer": layer - 1,
                             "answer_prob": float(ans[layer].exp()),
                             "answer_rank": int(ranks[layer]),
                             "kl_to_final": max(float(kl[layer, b]), 0.0),
                             "top_token": _token_str(model, int(tops[layer]))})
    n_chunks = -(-len(facts) // batch_size)
    return pd.DataFrame([row for rows in distributed.gather_in_order(local, n_chunks)
                         for row in rows])
