"""FFN key-value memories (Geva, Schuster, Berant and Levy 2021, "Transformer Feed-Forward
Layers Are Key-Value Memories", EMNLP).

Every FFN neuron is a key (its input weights) that fires on textual patterns and a value (its
row of ``W_out``) that promotes tokens. :func:`kv_memories` streams a corpus and keeps, per
neuron, its top-k activating contexts in bounded running top-k tensors (:class:`TopKContexts`);
projects every value vector through the unembedding to the tokens it promotes and suppresses;
and measures, per layer, how often a value's top token is the next token of its key's top
trigger context, against a neuron-shuffled baseline (Geva et al. Sec. 4). Text reaches the
model through :func:`interp.tokenize.batches` (:func:`corpus_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from analyses import distributed
from analyses.ffn.readout import _token_str, check_model, dense_layers
from interp import HookedTransformer, tokenize
from interp.errors import InterpError
from interp.progress import Progress, no_progress


class TopKContexts:
    """Running top-k activating contexts per neuron, in bounded memory.

    Holds, for each layer, ``values`` [k, d_mlp] and ``contexts`` [k, d_mlp, context + 1]
    (the ``context`` tokens ending at the firing position, then the next token; -1 = none),
    so a 10x larger corpus costs 10x time and the same memory (Geva et al. 2021 keep the
    top-25 trigger examples per key).
    """

    def __init__(self, layers: Sequence[int], d_mlp: int, k: int = 25, context: int = 8):
        if k < 1 or context < 1:
            raise InterpError(f"top_k and context must be >= 1, got {k} and {context}.")
        self.layers, self.k, self.context, self.d_mlp = list(layers), k, context, d_mlp
        self.values = {layer: torch.full((k, d_mlp), -math.inf) for layer in self.layers}
        self.contexts = {layer: torch.full((k, d_mlp, context + 1), -1, dtype=torch.int32)
                         for layer in self.layers}
        self.n_tokens = 0

    def windows(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[batch, pos] -> [n_valid, context + 1]: the context ending at each valid position
        and the next token."""
        B, T = tokens.shape
        t = torch.where(valid, tokens, torch.full_like(tokens, -1))
        nxt = torch.cat([t[:, 1:], torch.full((B, 1), -1, dtype=t.dtype)], 1)
        padded = torch.cat([torch.full((B, self.context - 1), -1, dtype=t.dtype), t], 1)
        win = padded.unfold(1, self.context, 1)  # [B, T, context]
        return torch.cat([win, nxt[..., None]], -1)[valid].to(torch.int32)

    def update(self, layer: int, acts: torch.Tensor, windows: torch.Tensor) -> None:
        """Merge one batch's activations [n_valid, d_mlp] (with their windows) into layer's
        top-k."""
        if acts.shape[0] == 0:
            return
        kk = min(self.k, acts.shape[0])
        vals, idx = acts.float().topk(kk, dim=0)  # [kk, d_mlp]
        ctx = windows[idx]  # [kk, d_mlp, context + 1]
        all_vals = torch.cat([self.values[layer], vals])
        all_ctx = torch.cat([self.contexts[layer], ctx])
        top, sel = all_vals.topk(self.k, dim=0)
        self.values[layer] = top
        self.contexts[layer] = all_ctx.gather(0, sel[..., None].expand(-1, -1, self.context + 1))


@dataclass
class KVMemories:
    """Result of :func:`kv_memories`.

    ``neurons``: one row per (layer, neuron): ``max_activation``, ``top_context`` and
    ``top_next`` (its strongest trigger and the token after it), ``value_top`` and
    ``value_bottom`` (tokens its value vector promotes / suppresses most),
    ``agree_top1`` (value's top token == next token of the top trigger) and ``agree_any``
    (== the next token of any of its top-k triggers).
    ``agreement``: per layer, the two agreement rates and their neuron-shuffled baselines.
    ``store``: the running top-k (for :func:`trigger_table`).
    """

    neurons: pd.DataFrame
    agreement: pd.DataFrame
    store: TopKContexts
    value_top_ids: dict[int, torch.Tensor]


def corpus_batches(model: HookedTransformer, texts: Iterable[str], *, batch_size: int = 8,
                   max_tokens: int | None = None,
                   max_len: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenise texts (one sequence each, cut to ``max_len`` tokens) into right-padded
    batches ``(tokens, attention_mask)`` on the model's device (the mask 1 = token, 0 =
    padding); stop after exactly ``max_tokens`` tokens. Sequences shorter than two tokens are
    skipped (they have no next token). :func:`interp.tokenize.batches` does the work; a model
    with learned positions reads at most ``n_ctx`` tokens of a text."""
    cfg = model.cfg
    seq_len = min(max_len, cfg.n_ctx) if cfg.positional == "learned" else max_len
    for batch in tokenize.batches(model, texts, batch_size=batch_size, seq_len=seq_len,
                                  max_tokens=max_tokens, split=False, min_len=2,
                                  pad=tokenize.pad_id(model), budget="exact"):
        yield batch.tokens.to(model.device), batch.attention_mask.long().to(model.device)


@torch.no_grad()
def _value_projection(model: HookedTransformer, layer: int, n: int,
                      chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n promoted and suppressed token ids [d_mlp, n] of each value vector (row of
    W_out) read through the final norm's gain and the unembedding (Geva et al. Sec. 4)."""
    W_out = model.blocks[layer].mlp.W_out.float()  # [d_mlp, d_model]
    ln = getattr(model, "ln_final", None)
    if ln is not None and hasattr(ln, "w"):
        if hasattr(ln, "b"):  # LayerNorm centres: a direction's mean component is removed
            W_out = W_out - W_out.mean(-1, keepdim=True)
        W_out = W_out * ln.w.float()
    W_U = model.W_U.float()
    tops, bottoms = [], []
    # one [chunk, d_vocab] buffer reused, negated in place for the bottom tokens: a fresh
    # 100 MB product and its negated copy per chunk cost 20% of this function in page faults
    # (same kernels, same values: the indices are identical)
    buf = torch.empty(min(chunk, W_out.shape[0]), W_U.shape[1], device=W_U.device)
    for s in range(0, W_out.shape[0], chunk):
        rows = W_out[s:s + chunk]
        logits = torch.matmul(rows, W_U, out=buf[:rows.shape[0]])  # [chunk, d_vocab]
        tops.append(logits.topk(n, dim=-1).indices)
        bottoms.append(logits.neg_().topk(n, dim=-1).indices)
    return torch.cat(tops).cpu(), torch.cat(bottoms).cpu()


def _fill_store(model: HookedTransformer, batches: Iterable[tuple[torch.Tensor,
                                                                 torch.Tensor | None]],
                store: TopKContexts, progress: Progress) -> None:
    """Stream ``batches`` through the model into ``store`` (``mlp.hook_post`` of its layers;
    padding and BOS positions skipped, BOS carries no pattern)."""
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    names = {f"blocks.{layer}.mlp.hook_post": layer for layer in store.layers}
    for tokens, mask in progress(batches, desc="key-value memories"):
        valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        if bos is not None:
            valid = valid & (tokens != bos)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=None,
                                        names_filter=lambda n: n in names)
        windows = store.windows(tokens.cpu(), valid.cpu())
        for name, layer in names.items():
            store.update(layer, cache[name][valid].cpu(), windows)
        store.n_tokens += int(valid.sum())


def _agreement(layer: int, vals: torch.Tensor, nxt: torch.Tensor, v1: torch.Tensor,
               n_shuffles: int, gen: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One layer's agreement row (rates and shuffled baselines), and per neuron whether its
    value's top token ``v1`` is the next token of its top trigger / of any trigger."""
    has = torch.isfinite(vals) & (nxt >= 0)
    top1_ok = has[0]
    agree1 = (nxt[0] == v1) & top1_ok
    agree_any = ((nxt == v1[None]) & has).any(0)
    any_ok = has.any(0)
    base1, base_any = [], []
    for _ in range(n_shuffles):
        perm = torch.randperm(len(v1), generator=gen)
        pv = v1[perm]
        base1.append(float(((nxt[0] == pv) & top1_ok).sum()) / max(int(top1_ok.sum()), 1))
        base_any.append(float((((nxt == pv[None]) & has).any(0)).sum())
                        / max(int(any_ok.sum()), 1))
    row = {"layer": layer, "agreement_top1": float(agree1.sum()) / max(int(top1_ok.sum()), 1),
           "baseline_top1": float(np.mean(base1)),
           "agreement_any": float(agree_any.sum()) / max(int(any_ok.sum()), 1),
           "baseline_any": float(np.mean(base_any)), "n_neurons": int(top1_ok.sum())}
    return row, agree1, agree_any


@torch.no_grad()
def kv_memories(model: HookedTransformer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *,
                layers: Sequence[int] | None = None, top_k: int = 25, context: int = 8,
                n_value_tokens: int = 5, n_shuffles: int = 20, seed: int = 0,
                progress: Progress = no_progress) -> KVMemories:
    """FFN key-value memories (Geva et al. 2021): stream ``batches`` of ``(tokens,
    attention_mask)``; keep each neuron's top-``top_k`` activating contexts (``mlp.hook_post``;
    BOS positions skipped, they carry no pattern); project each value vector to the vocabulary;
    per layer, the agreement rate between a value's top token and the next token of its top
    trigger context(s), against a baseline that pairs values with other neurons' triggers
    (random permutations of neurons within the layer, ``n_shuffles`` of them).

    Gated FFNs (SwiGLU) can fire negatively; the top contexts are the most positive ones.
    Under ``--nproc N`` the per-layer work (value projections through the unembedding,
    agreement, the per-neuron table: most of the time) is sharded over the ranks by layer and
    gathered in layer order; every rank streams the whole corpus (a batch-sharded top-k merge
    would need a tie-break for equal activations that the one-process order does not define).
    """
    check_model(model)
    layers = dense_layers(model) if layers is None else list(layers)
    bad = [layer for layer in layers if layer not in dense_layers(model)]
    if bad:
        raise InterpError(f"Layers {bad} have no dense FFN; valid layers: {dense_layers(model)}.")
    store = TopKContexts(layers, model.cfg.d_mlp, top_k, context)
    _fill_store(model, batches, store, progress)
    if store.n_tokens == 0:
        raise InterpError("The corpus produced no tokens; pass a non-empty text file.")
    gen = torch.Generator().manual_seed(seed)
    tok = getattr(model, "tokenizer", None)
    decode: Callable[[list[int]], str] = (
        (lambda ids: tok.decode([i for i in ids if i >= 0])) if tok is not None
        else (lambda ids: " ".join(str(i) for i in ids if i >= 0)))
    vocab_cache: dict[int, str] = {}

    def tstr(i: int) -> str:
        if i not in vocab_cache:
            vocab_cache[i] = _token_str(model, i) if i >= 0 else ""
        return vocab_cache[i]

    local: dict[int, tuple[list[dict], dict, torch.Tensor]] = {}
    for li, layer in enumerate(layers):
        if not distributed.mine(li):  # another rank's layer: draw its shuffles all the same,
            for _ in range(n_shuffles):  # so every rank's generator stays in step
                torch.randperm(model.cfg.d_mlp, generator=gen)
            continue
        top_ids, bottom_ids = _value_projection(model, layer, n_value_tokens)
        vals, ctx = store.values[layer], store.contexts[layer]  # [k, d], [k, d, C+1]
        nxt = ctx[..., -1].long()  # [k, d]
        row, agree1, agree_any = _agreement(layer, vals, nxt, top_ids[:, 0], n_shuffles, gen)
        # plain lists first: indexing the tensors one neuron at a time was ~10% of the stage
        top_act = torch.where(torch.isfinite(vals[0]), vals[0], math.nan).tolist()
        rows = [{"layer": layer, "neuron": i, "max_activation": act,
                 "top_context": decode(context), "top_next": tstr(nx),
                 "value_top": " | ".join(tstr(t) for t in tops),
                 "value_bottom": " | ".join(tstr(t) for t in bottoms),
                 "agree_top1": a1, "agree_any": a_any}
                for i, (act, context, nx, tops, bottoms, a1, a_any) in enumerate(zip(
                    top_act, ctx[0, :, :-1].tolist(), nxt[0].tolist(), top_ids.tolist(),
                    bottom_ids.tolist(), agree1.bool().tolist(), agree_any.bool().tolist(),
                    strict=True))]
        local[li] = (rows, row, top_ids[:, 0])
    per_layer = distributed.gather_in_order(local, len(layers))  # every rank's layers, in order
    rows = [r for layer_rows, _, _ in per_layer for r in layer_rows]
    agree_rows = [row for _, row, _ in per_layer]
    value_top_ids = {layer: top for layer, (_, _, top) in zip(layers, per_layer, strict=True)}
    return KVMemories(neurons=pd.DataFrame(rows), agreement=pd.DataFrame(agree_rows), store=store,
                      value_top_ids=value_top_ids)


def trigger_table(model: HookedTransformer, kv: KVMemories,
                  neurons: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """Every stored trigger context of the given (layer, neuron) pairs: ``layer, neuron,
    rank, activation, context, next_token`` plus the value's promoted tokens."""
    tok = getattr(model, "tokenizer", None)
    rows = []
    for layer, neuron in neurons:
        if layer not in kv.store.values:
            continue
        vals, ctx = kv.store.values[layer][:, neuron], kv.store.contexts[layer][:, neuron]
        promoted = kv.neurons.loc[(kv.neurons["layer"] == layer)
                                  & (kv.neurons["neuron"] == neuron), "value_top"]
        for r in range(len(vals)):
            if not torch.isfinite(vals[r]):
                continue
            ids = [i for i in ctx[r, :-1].tolist() if i >= 0]
            nxt = int(ctx[r, -1])
            rows.append({"layer": layer, "neuron": neuron, "rank": r + 1,
                         "activation": float(vals[r]),
                         "context": tok.decode(ids) if tok is not None else " ".join(map(str, ids)),
                         "next_token": _token_str(model, nxt) if nxt >= 0 else "",
                         "value_top": promoted.iloc[0] if len(promoted) else ""})
    return pd.DataFrame(rows, columns=["layer", "neuron", "rank", "activation", "context",
                                       "next_token", "value_top"])
