"""Memory-augmented attention: which heads read the memory, what they retrieve, and whether it
matters.

Method, on a model trained on the ``retrieval`` task (:mod:`interp.train.tasks.retrieval`):
each held-out document is fed segment by segment through ``model.memory``; the last segment,
whose queries need a value given segments earlier, is then run with the memory frozen while
hooks read it (so every variant below sees the same memory):

- **Memory share per head**: the attention mass a head puts on memory entries
  (``hook_mem_pattern`` summed over entries; one softmax with the context for persistent and
  XL memory, Sukhbaatar et al. 2019, Dai et al. 2019; and for a kNN memory with
  ``memory_joint``, Tworkowski et al. 2023) or, for a gated kNN memory, its gate
  ``sigmoid(g_h)`` (``hook_mem_gate``, the share of its output taken from retrieval, Wu et
  al. 2022), at the query positions and over all positions.
- **Retrieved entries**: each memory entry is mapped back to the document positions it holds
  (a kNN store entry is one past token; an XL state one token; a compressed state the
  ``cmem_rate`` tokens pooled into it, Rae et al. 2020). A head *retrieves* when its
  top-weighted entry at the query holds the position of the query key's earlier occurrence
  (segment 0 stores the pair value first, so the value reaches the key's state through a
  previous-token head; with the task's ``order="kv"`` the pair is stored key first and the
  target is the value's position, whose previous token is the key: an induction head's
  target) for at least half of the queries, or when cutting its memory access
  alone costs half of the accuracy above chance.
- **Ablation of memory access** (one head at a time, then the retrieving heads together,
  then every memory head): a gated kNN head's gate set to 0 (it keeps its local attention), or the
  head's memory scores set to the dtype's minimum (the softmax renormalises over the context);
  the accuracy drop against the intact model and chance (1 / n_values).

Returns tidy DataFrames; nothing here plots or writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from interp.errors import InterpError

__all__ = ["MemoryAnalysis", "analyse_memory", "entry_positions"]


@dataclass
class MemoryAnalysis:
    """``heads``: one row per (layer, head) of a memory layer: ``memory_share_query``,
    ``memory_share_all``, ``target_mass`` (attention on the stored key's entry, within the
    memory), ``top1_target`` (share of queries whose top entry holds it), ``acc_ablated``,
    ``acc_drop``, ``retrieving``. ``retrieved``: the top entries of the retrieving heads for a
    few queries (entry, positions, tokens, weight, ``is_target``). ``accuracy``: one row per
    condition (intact, memory reset, retrieving heads ablated, every memory head ablated,
    chance)."""

    heads: pd.DataFrame
    retrieved: pd.DataFrame
    accuracy: pd.DataFrame
    retrieving_heads: list[tuple[int, int]]


def entry_positions(model: Any, layer: int, seen: int) -> list[tuple[int, int]]:
    """Document positions [lo, hi) held by each memory entry of ``layer`` after ``seen``
    tokens were written (segments of ``n_ctx``-sized pieces, fed in order)."""
    cfg, store = model.cfg, model.memory.stores[layer]
    if cfg.memory_kind == "knn":
        n = 0 if store.k is None else store.k.shape[1]
        return [(seen - n + i, seen - n + i + 1) for i in range(n)]
    if cfg.memory_kind != "xl":
        raise InterpError("Memory entries map to positions for knn and xl memory only.")
    n_states = 0 if store.states is None else store.states.shape[1]
    n_comp = 0 if store.compressed is None else store.compressed.shape[1]
    r, first_state = cfg.cmem_rate, seen - n_states
    pooled = first_state // r  # pooled states written so far (no ragged tails: whole slots)
    comp = [((pooled - n_comp + j) * r, (pooled - n_comp + j + 1) * r) for j in range(n_comp)]
    return comp + [(first_state + i, first_state + i + 1) for i in range(n_states)]


def _ablate_hook(kind: str, heads: Iterable[int]) -> tuple[str, Callable]:
    """(hook suffix, hook fn) cutting the memory access of ``heads``: ``kind`` "gate" sets a
    gated kNN head's gate to 0, any other kind its memory scores to the minimum."""
    idx = list(heads)

    if kind == "gate":
        def gate(g: torch.Tensor, hook: Any) -> torch.Tensor:
            g = g.clone()
            g[idx] = 0.0
            return g
        return "hook_mem_gate", gate

    def scores(s: torch.Tensor, hook: Any) -> torch.Tensor:
        s = s.clone()
        s[:, idx] = torch.finfo(s.dtype).min
        return s
    return "hook_mem_scores", scores


class _Run:
    """One batch of documents with the memory filled by every segment but the last."""

    def __init__(self, model: Any, task: Any, tokens: torch.Tensor, labels: torch.Tensor):
        L = task.params["segment_len"]
        self.kv = task.params.get("order") == "kv"
        self.model, self.L = model, L
        self.last, self.labels = tokens[:, -L:], labels[:, -L:]
        self.tokens, self.seen = tokens, tokens.shape[1] - L
        model.memory.reset()
        with torch.no_grad():
            model.memory.run(tokens[:, : self.seen], L)

    def logits(self, hooks: list[tuple[str, Callable]] = ()) -> torch.Tensor:
        with torch.no_grad(), self.model.memory.frozen():
            return self.model.run_with_hooks(self.last, fwd_hooks=list(hooks))

    def correct(self, hooks: list[tuple[str, Callable]] = ()) -> tuple[int, int]:
        keep = self.labels != -100
        pred = self.logits(hooks)[keep].argmax(-1)
        return int((pred == self.labels[keep]).sum()), int(keep.sum())

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, query position in the last segment, document position of the target) per
        query: the entry a retrieving head should read. Stored ``v k`` (the default order),
        the stored key's, as the value reaches the key's state through a previous-token
        head; stored ``k v`` (``order="kv"``), the value's right after it, the state whose
        previous token is the key (an induction head's target)."""
        rows, qpos = (self.labels != -100).nonzero(as_tuple=True)
        first = self.tokens[:, : self.L]
        keys = self.last[rows, qpos]
        return rows, qpos, (first[rows] == keys[:, None]).float().argmax(1) + int(self.kv)


def _grab(model: Any, run: _Run, layers: list[int]) -> dict[str, torch.Tensor]:
    names = [f"blocks.{i}.attn.{h}" for i in layers
             for h in ("hook_mem_pattern", "hook_mem_indices", "hook_mem_gate")]
    store: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook: Any) -> None:
        store[hook.name] = t.detach()

    valid = set(model.hook_dict)
    run.logits([(n, keep) for n in names if n in valid])
    return store


def _head_stats(model: Any, run: _Run, layer: int, grab: dict[str, torch.Tensor],
                acc: dict[tuple[int, int], list[float]]) -> None:
    """Add this batch's sums for every head of ``layer`` into ``acc``."""
    kind, pre = model.cfg.memory_kind, f"blocks.{layer}.attn."
    pat = grab[pre + "hook_mem_pattern"].float()  # [batch, head, q, mem | topk]
    rows, qpos, target = run.targets()
    if pre + "hook_mem_gate" in grab:  # a gated kNN memory
        share = grab[pre + "hook_mem_gate"].float()[None, :, None].expand(pat.shape[:3])
    else:
        share = pat.sum(-1)  # [batch, head, q]
    entries = (grab[pre + "hook_mem_indices"] if kind == "knn"  # [batch, head, q, topk]
               else torch.arange(pat.shape[-1]).expand(pat.shape))
    spans = entry_positions(model, layer, run.seen) if kind != "persistent" else []
    lo = torch.tensor([s[0] for s in spans] or [0])
    hi = torch.tensor([s[1] for s in spans] or [0])
    for h in range(pat.shape[1]):
        a = acc.setdefault((layer, h), [0.0] * 6)
        q_share = share[rows, h, qpos]
        a[0] += float(q_share.sum())
        a[1] += float(share[:, h].mean(-1).sum())
        a[2] += len(rows)
        a[3] += pat.shape[0]
        if spans:
            e = entries[rows, h, qpos]  # [n_query, topk | mem]
            w = pat[rows, h, qpos] / pat[rows, h, qpos].sum(-1, keepdim=True).clamp(min=1e-9)
            hit = (lo[e] <= target[:, None]) & (target[:, None] < hi[e])
            a[4] += float((w * hit).sum())
            a[5] += float(hit.gather(1, w.argmax(-1, keepdim=True)).float().sum())


def _examples(model: Any, run: _Run, grab: dict[str, torch.Tensor], heads: list[tuple[int, int]],
              n: int) -> list[dict[str, Any]]:
    """The top entries of the retrieving heads for the first ``n`` queries of the batch."""
    tok = model.tokenizer
    rows, qpos, target = run.targets()
    out = []
    for i in range(min(n, len(rows))):
        b, q, t = int(rows[i]), int(qpos[i]), int(target[i])
        for layer, h in heads:
            pre = f"blocks.{layer}.attn."
            pat = grab[pre + "hook_mem_pattern"][b, h, q].float()
            idx = (grab[pre + "hook_mem_indices"][b, h, q] if model.cfg.memory_kind == "knn"
                   else torch.arange(len(pat)))
            spans = entry_positions(model, layer, run.seen)
            for rank, j in enumerate(pat.argsort(descending=True)[:3].tolist()):
                lo, hi = spans[int(idx[j])]
                words = tok.decode(run.tokens[b, lo:hi].tolist()) if tok else ""
                out.append({"doc": b, "query_pos": run.seen + q,
                            "query": tok.decode([int(run.last[b, q])]) if tok else "",
                            "answer": tok.decode([int(run.labels[b, q])]) if tok else "",
                            "layer": layer, "head": h, "rank": rank, "entry": int(idx[j]),
                            "positions": f"{lo}-{hi - 1}", "tokens": words,
                            "weight": float(pat[j]), "is_target": lo <= t < hi})
    return out


def analyse_memory(model: Any, *, n_docs: int = 256, batch_size: int = 64, seed: int = 12345,
                   n_examples: int = 4, progress: Callable[..., Iterable] | None = None
                   ) -> MemoryAnalysis:
    """The memory report of a memory model trained on ``retrieval`` (see the module docstring).

    Long because it is the one pass the three tables share: fill the memory, read the heads,
    ablate each head, then the retrieving set, on the same batches."""
    from interp.train import task_from

    if getattr(model, "memory", None) is None:
        raise InterpError("This model has no memory (cfg.memory_kind is None); the memory "
                          "analysis needs a model such as interp/data/retrieval_knn.pt.")
    task = task_from(model)
    if task.name != "retrieval":
        raise InterpError(f"The memory analysis needs a model trained on 'retrieval', not "
                          f"{task.name!r}.")
    kind, layers, nh = model.cfg.memory_kind, list(model.memory.layers), model.cfg.n_heads
    cut = "gate" if kind == "knn" and not model.cfg.memory_joint else kind  # how to ablate
    dev = model.embed.W_E.device
    sizes = [min(batch_size, n_docs - s) for s in range(0, n_docs, batch_size)]

    def runs(desc: str) -> Iterable[_Run]:
        gen = torch.Generator().manual_seed(seed)  # the same documents in both passes
        made = (_Run(model, task, b.tokens.to(dev), b.labels.to(dev))
                for b in (task.eval_batch(n, gen) for n in sizes))
        return progress(made, desc=desc, total=len(sizes)) if progress else made

    acc: dict[tuple[int, int], list[float]] = {}
    counts: dict[Any, list[int]] = {}
    for run in runs("memory: heads"):
        grab = _grab(model, run, layers)
        for layer in layers:
            _head_stats(model, run, layer, grab, acc)
        _add(counts, "intact", run.correct())
        for layer in layers:
            for h in range(nh):
                suffix, fn = _ablate_hook(cut, [h])
                _add(counts, (layer, h), run.correct([(f"blocks.{layer}.attn.{suffix}", fn)]))
        _add(counts, "all", run.correct(_hooks(cut, [(la, h) for la in layers
                                                      for h in range(nh)])))
    chance = 1.0 / task.params["n_values"]
    base = counts["intact"][0] / counts["intact"][1]
    heads = _heads_frame(acc, counts, base, chance)
    order = [(int(r.layer), int(r.head)) for r in heads.sort_values(
        ["acc_drop", "top1_target"], ascending=False).itertuples()]
    flagged = {(int(r.layer), int(r.head)) for r in heads.itertuples() if r.retrieving}
    sets = [sorted(flagged | set(order[:k])) for k in range(1, len(order) + 1)]
    examples: list[dict[str, Any]] = []
    for run in runs("memory: retrieving heads"):  # head sets ablated together, same memories
        for k, heads_k in enumerate(sets, 1):
            _add(counts, ("top", k), run.correct(_hooks(cut, heads_k)))
        if kind != "persistent" and not examples:
            examples = _examples(model, run, _grab(model, run, layers), order[:1], n_examples)
        model.memory.reset()  # then the last segment alone: what a model without memory sees
        _add(counts, "reset", run.correct())
    # the retrieving heads: those flagged on their own, plus the fewest heads by decreasing
    # single-head drop whose memory access together with theirs carries at least three
    # quarters of the accuracy above chance; the accuracy row is that very set's ablation
    k = next((k for k in range(1, len(order) + 1) if counts[("top", k)][0]
              / max(counts[("top", k)][1], 1) <= chance + 0.25 * (base - chance)), len(order))
    named = sets[k - 1]
    counts["retrieving"] = counts[("top", k)]
    heads["retrieving"] = [(int(r.layer), int(r.head)) in named for r in heads.itertuples()]
    if kind != "persistent" and examples:
        examples = [e for e in examples if (e["layer"], e["head"]) in named] or examples
    model.memory.reset()
    return MemoryAnalysis(heads=heads, retrieved=pd.DataFrame(examples),
                          accuracy=_accuracy_frame(counts, chance), retrieving_heads=named)


def _hooks(kind: str, heads: list[tuple[int, int]]) -> list[tuple[str, Callable]]:
    """Hooks cutting the memory access of every (layer, head) in ``heads``."""
    out = []
    for layer in sorted({la for la, _ in heads}):
        suffix, fn = _ablate_hook(kind, [h for la, h in heads if la == layer])
        out.append((f"blocks.{layer}.attn.{suffix}", fn))
    return out


def _add(counts: dict[Any, list[int]], key: Any, hit_total: tuple[int, int]) -> None:
    c = counts.setdefault(key, [0, 0])
    c[0] += hit_total[0]
    c[1] += hit_total[1]


def _heads_frame(acc: dict[tuple[int, int], list[float]], counts: dict[Any, list[int]],
                 base: float, chance: float) -> pd.DataFrame:
    rows = []
    for (layer, h), a in sorted(acc.items()):
        ablated = counts[(layer, h)][0] / max(counts[(layer, h)][1], 1)
        n_q = max(a[2], 1)
        top1 = a[5] / n_q
        drop = base - ablated
        rows.append({"layer": layer, "head": h, "memory_share_query": a[0] / n_q,
                     "memory_share_all": a[1] / max(a[3], 1), "target_mass": a[4] / n_q,
                     "top1_target": top1, "acc_ablated": ablated, "acc_drop": drop,
                     "retrieving": bool(top1 >= 0.5 or drop >= 0.5 * (base - chance) > 0)})
    return pd.DataFrame(rows)


def _accuracy_frame(counts: dict[Any, list[int]], chance: float) -> pd.DataFrame:
    names = {"intact": "memory intact", "retrieving": "retrieving heads' memory ablated",
             "all": "every memory head ablated", "reset": "memory reset (last segment alone)"}
    rows = [{"condition": text, "accuracy": counts[k][0] / max(counts[k][1], 1),
             "queries": counts[k][1]} for k, text in names.items()]
    rows.append({"condition": "chance (1 / n_values)", "accuracy": chance, "queries": 0})
    return pd.DataFrame(rows)
