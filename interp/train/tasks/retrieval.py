"""The ``retrieval`` task: recall a value whose key was given several segments earlier.

It plants an answer beyond the local attention window, so only a memory can reach it: a
document of ``n_segments`` segments of ``segment_len`` tokens is fed one segment at a time
(:meth:`Retrieval.forward`), each segment seeing only itself as context. The first segment
holds ``n_pairs`` key-value pairs; the last asks for some of them by key, and the model must
name each one's value (segments in between hold other pairs, answered locally). Without
memory the answer is a guess among ``n_values`` (chance = 1 / n_values); with a kNN store
(Wu et al. 2022) or Transformer-XL / compressive memory (Dai et al. 2019; Rae et al. 2020) it
is a lookup: the query key matches its stored occurrence, whose state carries the value
before it (Olsson et al. 2022).
"""

from __future__ import annotations

from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.tokenizers import WordTokenizer
from interp.train.tasks.base import Batch, Task, int_param

__all__ = ["Retrieval"]


class Retrieval(Task):
    """Documents ``[seg 0: v k .. filler] [.. v' k' .. k' v' ..] .. [last: .. k ? .. k'' ?]``.

    Vocabulary: keys ``k0..`` (``n_keys``), values ``v0..`` (``n_values``), filler ``f0..``
    (``n_filler``). A pair is stored value first, ``v k``, in an aligned 2-token slot (a
    compressive memory pooling 2 states to 1 keeps it together), and asked key first: at
    ``k`` the model must name the value that preceded it (associative recall: a
    previous-token head writes v into k's state, a later head finds k's earlier state and
    copies it, Olsson et al. 2022). Segment 0 stores ``n_pairs`` pairs with distinct keys in
    random slots, the other slots filler; the last segment asks ``n_queries`` of them, and
    nothing in it reveals their values. Every segment after the first also stores and asks
    ``n_local`` fresh pairs of its own, which the context alone answers: they teach the same
    heads. The loss is taken at every asked key; the accuracy (:meth:`eval_batch`) only at
    the memory queries.

    ``order="kv"`` stores every pair key first, ``k v``, as it is asked: the classic induction
    setup, where the head that answers ``k ?`` finds the state whose *previous* token is k
    (K-composition with a previous-token head) and copies that state's token, so the query
    never matches its own position; the default ``"vk"`` keeps the documents above exactly.
    """

    name = "retrieval"
    mechanism = ("a memory head matches the query key with its stored occurrence, whose state "
                 "carries the value before it, beyond the local window (Wu et al. 2022; Dai "
                 "et al. 2019)")
    defaults = {"n_keys": 32, "n_values": 16, "n_filler": 16, "segment_len": 16,
                "n_segments": 4, "n_pairs": 4, "n_queries": 4, "n_local": 2,
                "order": "vk"}
    model_defaults = {"n_layers": 2, "d_model": 64, "n_heads": 4, "attn_only": True,
                      "positional": "learned", "memory_kind": "knn", "memory_layers": [1],
                      "memory_topk": 8, "default_prepend_bos": False}
    train_defaults = {"steps": 3000, "batch_size": 32, "lr": 3e-3}

    def _validate(self) -> None:
        p = self.params
        for name in ("n_keys", "n_values", "n_filler"):
            int_param(name, p[name], 2, 1000)
        int_param("segment_len", p["segment_len"], 4, 4096)
        int_param("n_segments", p["n_segments"], 2, 64)
        if p["segment_len"] % 2:
            raise InterpError(f"Task parameter segment_len must be even (pairs fill aligned "
                              f"2-token slots), got {p['segment_len']}.")
        int_param("n_pairs", p["n_pairs"], 1, min(p["n_keys"], p["segment_len"] // 2))
        int_param("n_queries", p["n_queries"], 1, p["n_pairs"])
        int_param("n_local", p["n_local"], 0, 64)
        if p["order"] not in ("vk", "kv"):
            raise InterpError(f"Task parameter order must be 'vk' (pairs stored value first) or "
                              f"'kv' (key first, as asked), got {p['order']!r}.")
        if p["n_pairs"] + p["n_local"] * (p["n_segments"] - 1) > p["n_keys"]:
            raise InterpError("Every pair needs its own key: n_pairs + n_local * (n_segments - "
                              f"1) must be at most n_keys={p['n_keys']}; raise n_keys.")
        if p["n_queries"] + 2 * p["n_local"] > p["segment_len"] // 2:
            raise InterpError("n_queries + 2 * n_local pairs must fit the last segment's "
                              f"{p['segment_len'] // 2} slots; lower them or raise segment_len.")

    def _build_tokenizer(self) -> WordTokenizer:
        p = self.params
        return WordTokenizer([f"k{i}" for i in range(p["n_keys"])]
                             + [f"v{i}" for i in range(p["n_values"])]
                             + [f"f{i}" for i in range(p["n_filler"])], bos_token=None)

    @property
    def seq_len(self) -> int:
        return self.params["segment_len"] * self.params["n_segments"]

    def model_config(self, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """The default config; ``n_ctx`` is one segment (the local window)."""
        return super().model_config({"n_ctx": self.params["segment_len"], **(overrides or {})})

    def check_config(self, cfg: ModelConfig) -> None:
        """As every task, except that a model needs ``n_ctx`` of one segment only."""
        n_ctx, L = cfg.n_ctx, self.params["segment_len"]
        if n_ctx < L:
            raise InterpError(f"Task 'retrieval' feeds segments of {L} tokens but n_ctx="
                              f"{n_ctx}; set n_ctx to at least {L}.")
        super().check_config(cfg.replace(n_ctx=max(n_ctx, self.seq_len)))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Training documents: the loss at the memory queries and at the second occurrence
        of each local pair."""
        tokens, memory, local = self._draw(batch_size, generator)
        return Batch(tokens, torch.where(memory != -100, memory, local))

    def eval_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Held-out documents whose labels are the memory queries only (what accuracy means:
        the answer lies beyond the local window)."""
        tokens, memory, _ = self._draw(batch_size, generator)
        return Batch(tokens, memory)

    def _draw(self, batch_size: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels at the memory queries, labels at the local repeats)."""
        p = self.params
        B, L, S = batch_size, p["segment_len"], p["n_segments"]
        nk, nv, nf = p["n_keys"], p["n_values"], p["n_filler"]
        npair, nq, nl = p["n_pairs"], p["n_queries"], p["n_local"]
        tokens = torch.randint(nk + nv, nk + nv + nf, (B, S * L), generator=generator)
        memory, local = torch.full_like(tokens, -100), torch.full_like(tokens, -100)
        n_keys = npair + nl * (S - 1)  # distinct keys: segment 0's, then each segment's own
        kv = p["order"] == "kv"  # stored pairs key first (else value first)
        for b in range(B):
            keys = torch.randperm(nk, generator=generator)[:n_keys]
            values = torch.randint(0, nv, (n_keys,), generator=generator) + nk
            where = torch.randperm(L // 2, generator=generator)[:npair] * 2
            first, second = (keys, values) if kv else (values, keys)
            tokens[b, where], tokens[b, where + 1] = first[:npair], second[:npair]  # stored
            for seg in range(1, S):
                n_ask = nq if seg == S - 1 else 0
                slots = seg * L + torch.randperm(L // 2, generator=generator)[: n_ask + 2 * nl] * 2
                if n_ask:
                    ask = torch.randperm(npair, generator=generator)[:nq]
                    qpos = slots[:nq]
                    tokens[b, qpos], tokens[b, qpos + 1] = keys[ask], values[ask]
                    memory[b, qpos] = values[ask]
                mine = slice(npair + nl * (seg - 1), npair + nl * seg)
                pairs = slots[n_ask:].view(2, nl).sort(0).values  # stored, then asked
                tokens[b, pairs[0]], tokens[b, pairs[0] + 1] = first[mine], second[mine]
                tokens[b, pairs[1]], tokens[b, pairs[1] + 1] = keys[mine], values[mine]
                local[b, pairs[1]] = values[mine]
        return tokens, memory, local

    def forward(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of documents fed one segment at a time: through ``model.memory``
        (reset first; kept differentiable across the document while training), or, for a
        model without memory, each segment on its own."""
        L = self.params["segment_len"]
        if model.memory is None:
            return torch.cat([model(tokens[:, s : s + L]) for s in range(0, tokens.shape[1], L)],
                             1)
        model.memory.reset()
        model.memory.set_detach(not model.training)
        try:
            return model.memory.run(tokens, L)
        finally:
            model.memory.set_detach(True)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 256) -> dict[str, Any]:
        """``accuracy``: the value named at the repeated keys (argmax); ``chance`` = 1 /
        n_values; ``loss``: their mean cross-entropy. The memory is reset before and after."""
        gen = torch.Generator().manual_seed(seed)
        batch = self.eval_batch(batch_size, gen)
        dev = model.embed.W_E.device
        tokens, labels = batch.tokens.to(dev), batch.labels.to(dev)
        logits = self.forward(model, tokens)
        if model.memory is not None:
            model.memory.reset()
        return self.score(logits, labels)

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Accuracy and loss at the query positions of ``labels`` (-100 elsewhere)."""
        keep = labels != -100
        sel, want = logits.detach()[keep].float(), labels[keep]
        return {"accuracy": float((sel.argmax(-1) == want).float().mean()),
                "loss": float(torch.nn.functional.cross_entropy(sel, want)),
                "chance": 1.0 / self.params["n_values"]}
