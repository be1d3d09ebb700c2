"""Direct logit attribution: each component's share of the clean logit difference.

The final residual stream at the last position is a sum of component outputs (embeddings,
every head, every MLP or neuron, the biases). The final norm is linear once its scale is
fixed, so dividing each term by the clean run's cached scale (and centring it, for a
LayerNorm) and dotting it with ``tokens_to_residual_directions(answer) - (wrong)`` splits the
logit difference exactly (Elhage et al. (2021), *A Mathematical Framework for Transformer
Circuits*; Wang et al. (2022) sec. 3.1). interp's directions carry the final norm's gain, so
TransformerLens' decomposition on an interp cache is exact; what no component owns is the
final norm's bias and ``b_U`` (zero in RMSNorm models without an unembedding bias), reported
as ``unowned``.

By source position: a head's output at the last position is ``sum_k A[-1, k] (v_k W_O)``,
so its attribution splits over the positions it reads from, exactly.

Data-parallel (:mod:`analyses.distributed`): each rank decomposes its round-robin share of
the pair batches; the per-component sums and the pair counts are added over the ranks.
"""

from __future__ import annotations

import pandas as pd
import torch

from analyses import distributed
from analyses.circuits.pairs import PromptPairs
from analyses.circuits.patching import SiteSums, my_batches
from interp.progress import Progress, no_progress

__all__ = ["direct_logit_attribution", "dla_by_source_position"]

_LABEL_COLS = ("layer", "head", "neuron")


def _parse(label: str) -> dict:
    """TransformerLens' component labels (``L1H2``, ``L0N5``, ``0_mlp_out``, ``embed``)."""
    import re

    if m := re.fullmatch(r"L(\d+)H(\d+)", label):
        return {"kind": "head", "layer": int(m[1]), "head": int(m[2])}
    if m := re.fullmatch(r"L(\d+)N(\d+)", label):
        return {"kind": "neuron", "layer": int(m[1]), "neuron": int(m[2])}
    if m := re.fullmatch(r"(\d+)_mlp_out", label):
        return {"kind": "mlp", "layer": int(m[1])}
    return {"kind": label}


def _directions(model, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """[batch, d_model] answer-minus-wrong residual directions (norm gain included)."""
    return model.tokens_to_residual_directions(answer) - model.tokens_to_residual_directions(wrong)


@torch.no_grad()
def direct_logit_attribution(model, pairs: PromptPairs, *, expand_neurons: bool = False,
                             batch_size: int = 8, progress: Progress = no_progress,
                             ) -> pd.DataFrame:
    """Mean attribution of every component to the clean logit difference (answer - wrong).

    Columns ``component`` (TransformerLens' label), ``kind`` (``embed``, ``pos_embed``,
    ``head``, ``mlp``, ``neuron``, ``bias``), ``layer``, ``head``, ``neuron``,
    ``attribution``. ``df.attrs``: ``logit_diff`` (mean clean logit difference) and
    ``unowned`` (its part no component owns), so ``attribution.sum() + unowned == logit_diff``.
    """
    sums: torch.Tensor | None = None
    labels: list[str] = []
    n, ld, unowned = 0, 0.0, 0.0
    batches = [b for _, b in my_batches(pairs, batch_size)]
    for b in progress(batches, desc="direct logit attribution", total=len(batches)):
        b = b.to(model.device)
        logits, cache = model.run_with_cache(b.clean)
        stack, labels = cache.get_full_resid_decomposition(
            expand_neurons=expand_neurons, pos_slice=-1, return_labels=True)
        stack = cache.apply_ln_to_stack(stack, pos_slice=-1)  # [component, batch, d_model]
        attrs = (stack * _directions(model, b.answer, b.wrong)).sum(-1).double()
        rows = torch.arange(b.answer.shape[0], device=logits.device)
        diff = (logits[rows, -1, b.answer] - logits[rows, -1, b.wrong]).double()
        part = attrs.sum(1)
        sums = part if sums is None else sums + part
        ld += float(diff.sum())
        unowned += float((diff - attrs.sum(0)).sum())
        n += int(b.answer.shape[0])
        del cache
    labels, totals, ld, unowned, n = _merge(labels, sums, ld, unowned, n)
    df = pd.DataFrame([{"component": lab, **_parse(lab), "attribution": v / n}
                       for lab, v in zip(labels, totals, strict=True)])
    for col in _LABEL_COLS:
        if col not in df:
            df[col] = pd.NA
    df[list(_LABEL_COLS)] = df[list(_LABEL_COLS)].astype("Int64")
    df.attrs.update(logit_diff=ld / n, unowned=unowned / n, n_pairs=n)
    return df[["component", "kind", *_LABEL_COLS, "attribution"]]


def _merge(labels: list[str], sums: torch.Tensor | None, ld: float, unowned: float, n: int,
           ) -> tuple[list[str], list[float], float, float, int]:
    """The ranks' sums added (in rank order; a no-op in one process). Gathered rather than
    all-reduced because a rank left without a batch (fewer batches than ranks) has not run
    the decomposition, so it does not know the components."""
    parts = distributed.gather_objects((labels, None if sums is None else sums.tolist(),
                                        ld, unowned, n))
    got = [p for p in parts if p[1] is not None]
    totals = [sum(vals) for vals in zip(*(p[1] for p in got), strict=True)]
    return (got[0][0], totals, sum(p[2] for p in parts), sum(p[3] for p in parts),
            sum(p[4] for p in parts))


@torch.no_grad()
def dla_by_source_position(model, pairs: PromptPairs, *, batch_size: int = 8,
                           progress: Progress = no_progress) -> pd.DataFrame:
    """Each head's attribution split over the source positions its last-position query
    reads: columns ``layer``, ``head``, ``src_pos`` (index; pairs of one length line up),
    ``attribution`` (mean over pairs). Summed over ``src_pos`` it is the head's row of
    :func:`direct_logit_attribution`."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_O = model.W_O  # [layer, head, d_head, d_model]
    sums = SiteSums()
    n = 0
    names = ([f"blocks.{i}.attn.hook_v" for i in range(L)]
             + [f"blocks.{i}.attn.hook_pattern" for i in range(L)])
    batches = my_batches(pairs, batch_size)
    for i, b in progress(batches, desc="DLA by position", total=len(batches)):
        b = b.to(model.device)
        _, cache = model.run_with_cache(b.clean, names_filter=lambda nm: nm in names
                                        or nm.startswith("ln_final"))
        scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
        d = _directions(model, b.answer, b.wrong)  # [batch, d_model]
        centred = model.cfg.norm == "layernorm"
        for layer in range(L):
            v = cache[f"blocks.{layer}.attn.hook_v"]  # [batch, pos, kv_head, d_head]
            v = v.repeat_interleave(H // v.shape[2], dim=2)
            out = torch.einsum("bkhe,hem->bhkm", v, W_O[layer])  # [batch, head, pos, d_model]
            if centred:
                out = out - out.mean(-1, keepdim=True)
            a = cache[f"blocks.{layer}.attn.hook_pattern"][:, :, -1]  # [batch, head, k_pos]
            per = torch.einsum("bhk,bhkm,bm->hk", a, out / scale[:, None, None], d).double()
            for h in range(H):
                for k, value in enumerate(per[h].tolist()):
                    sums.add(i, (layer, h, k), {"layer": layer, "head": h, "src_pos": k}, value)
        n += int(b.answer.shape[0])
        del cache
    n = int(distributed.sum_values([n])[0])
    return pd.DataFrame([{**labels, "attribution": v / n} for labels, v in sums.merged()])
