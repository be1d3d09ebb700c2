"""The ``induction`` task: repeated random sequences that only induction heads can predict."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from interp.tokenizers import WordTokenizer
from interp.train.tasks.base import Batch, Task, int_param, next_token_labels

__all__ = ["Induction"]


class Induction(Task):
    """Repeated random sequences: ``[BOS] x1..xn x1..xn`` with x i.i.d. uniform over ``n_tokens``.

    The first copy is unpredictable (loss log(n_tokens) at best); the second is predictable
    only by looking back: find the previous occurrence of the current token and copy the token
    after it. A two-layer attention-only model does this with a previous-token head in layer 0
    (writes "the token before me was A" into each position) and an induction head in layer 1
    whose query "current token A" matches that key (K-composition) and whose OV circuit copies
    the attended token (Olsson et al. 2022, "In-context Learning and Induction Heads"; Elhage
    et al. 2021, "A Mathematical Framework for Transformer Circuits").

    Training data is built so that only induction solves it. With the classic layout alone
    the target is always n - 1 positions back, and one positional head in layer 0 solves the
    task without any induction (we measured exactly that). So each training sequence is
    ``[BOS] x1..xn`` followed by n tokens made of *fragments*: runs of ``min_frag``..``max_frag``
    tokens (uniform), each a run of the first half read circularly from a random start, so
    that every bigram of the first half is copied equally often. Inside a fragment the next
    token is the one after the previous occurrence of the current token; at a fragment's
    start (and where the run wraps from x_n to x_1) it is unpredictable, and there no loss is
    taken (as in Bietti et al. 2023, "Birth of a Transformer: A Memory Viewpoint", which
    trains only the predictable outputs): trained on those, every seed learned to hedge
    towards "any first-half token" and its induction attention fell from ~0.85 to 0.75-0.80
    as training went on. Loss is taken everywhere else, the first half included (its loss
    stays at log(n_tokens)); sequences are ``1 + 2 * half_len`` tokens. :meth:`evaluate` (and
    the tests) use the classic ``[BOS] x1..xn x1..xn`` with n = ``half_len``. Vocabulary:
    ``<bos>`` = 0, then ``t0``..``t{n_tokens-1}``.
    """

    name = "induction"
    mechanism = "previous-token head (layer 0) + induction head (layer 1), Olsson et al. 2022"
    threshold = 0.7  # induction_score from which the mechanism counts as formed
    defaults = {"n_tokens": 64, "half_len": 16, "min_frag": 2, "max_frag": 16}
    model_defaults = {"n_layers": 2, "d_model": 64, "n_heads": 4, "attn_only": True,
                      "positional": "learned"}
    train_defaults = {"steps": 4000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100,
                      "weight_decay": 0.01}

    def _validate(self) -> None:
        int_param("n_tokens", self.params["n_tokens"], 2)
        int_param("half_len", self.params["half_len"], 2)
        int_param("min_frag", self.params["min_frag"], 2, self.params["half_len"])
        int_param("max_frag", self.params["max_frag"], self.params["min_frag"],
                  self.params["half_len"])

    def _build_tokenizer(self) -> WordTokenizer:
        return WordTokenizer(["<bos>"] + [f"t{i}" for i in range(self.params["n_tokens"])])

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.params["half_len"]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        H, V = self.params["half_len"], self.params["n_tokens"]
        lo, hi = self.params["min_frag"], self.params["max_frag"]
        B = batch_size
        first = torch.randint(1, V + 1, (B, H), generator=generator)
        # second half: fragments of lo..hi tokens, each a run of the first half read circularly
        # from a uniform start (x_n is followed by x_1): every bigram of the first half, its
        # last included, is copied equally often, and every offset between a copy and its
        # source is equally likely. (Runs that had to fit inside the half copied its last
        # bigram 5x less often than the middle ones: no seed learned a previous-token head at
        # that key, so the query of x_{n-1} scored 0 on every head.)
        n_frag = H // lo + 1
        lengths = torch.randint(lo, hi + 1, (B, n_frag), generator=generator)
        src = torch.randint(0, H, (B, n_frag), generator=generator)
        ends = lengths.cumsum(1)
        j = torch.arange(H).expand(B, -1).contiguous()
        frag = torch.searchsorted(ends, j, right=True)  # [batch, H]
        within = j - (ends.gather(1, frag) - lengths.gather(1, frag))
        source = (src.gather(1, frag) + within) % H
        second = first.gather(1, source)
        tokens = torch.cat([torch.zeros(B, 1, dtype=torch.long), first, second], 1)
        labels = next_token_labels(tokens)
        # no loss where the next token starts a fragment or wraps to x_1: it is unpredictable,
        # and learning it teaches the model to hedge ("some token of the first half") everywhere
        labels[:, H:2 * H][(within == 0) | (source == 0)] = -100
        return Batch(tokens, labels)

    def eval_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The classic evaluation sequences ``[BOS] x1..xn x1..xn`` with n = ``half_len``.

        x1..xn are distinct (when ``n_tokens >= half_len``), so "the previous occurrence" of a
        token is unique and the induction target is well defined (as in Olsson et al. 2022).
        """
        H, V = self.params["half_len"], self.params["n_tokens"]
        if V >= H:
            half = torch.stack([torch.randperm(V, generator=generator)[:H]
                                for _ in range(batch_size)]) + 1
        else:
            half = torch.randint(1, V + 1, (batch_size, H), generator=generator)
        tokens = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), half, half], 1)
        return Batch(tokens, next_token_labels(tokens))

    def positions(self) -> dict[str, Any]:
        """Index sets for evaluation: ``first`` (label positions predicting x2..xn in the first
        copy), ``repeat`` (predicting x2..xn in the second copy), and for the attention score,
        ``queries`` (positions n+1..2n-1 holding x1..x_{n-1} of the second copy) with their
        ``targets`` (positions 2..n: the token after the previous occurrence)."""
        n = self.params["half_len"]
        return {
            "first": list(range(1, n)),  # logits at position t predict x_{t+1}
            "repeat": list(range(n + 1, 2 * n)),
            "queries": list(range(n + 1, 2 * n)),
            "targets": list(range(2, n + 1)),
        }

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 64) -> dict[str, Any]:
        """Loss on each copy, per-layer best previous-token and induction attention scores, and
        whether the mechanism formed.

        ``loss_first``: mean loss predicting x2..xn in the first copy (should stay near
        log(n_tokens)); ``loss_repeat``: the same tokens in the second copy (in-context: near 0).
        ``prev_token_score_l{l}`` / ``induction_score_l{l}``: the best head of layer l's mean
        attention to the previous position / to the induction target. ``induction_score``: the
        best over layers >= 1 (an induction head composes with an earlier layer's
        previous-token head; 0 for a one-layer model); ``mechanism_formed``: it reaches
        :attr:`threshold`; when it does not, ``warning`` says so in one line.
        """
        gen = torch.Generator().manual_seed(seed)
        batch = self.eval_batch(batch_size, gen)
        dev = model.embed.W_E.device
        tokens, labels = batch.tokens.to(dev), batch.labels.to(dev)
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0),
                              reduction="none")  # [batch, pos]
        pos = self.positions()
        out = {
            "loss_first": float(nll[:, pos["first"]].mean()),
            "loss_repeat": float(nll[:, pos["repeat"]].mean()),
            "log_vocab": math.log(self.params["n_tokens"]),
        }
        q = torch.tensor(pos["queries"], device=dev)
        k = torch.tensor(pos["targets"], device=dev)
        seq = torch.arange(1, tokens.shape[1], device=dev)
        for layer, name in enumerate(names):
            pat = cache[name].float()  # [batch, head, q, k]
            prev = pat[:, :, seq, seq - 1].mean((0, 2))  # [head]
            ind = pat[:, :, q, k].mean((0, 2))  # [head]
            out[f"prev_token_score_l{layer}"] = float(prev.max())
            out[f"prev_token_head_l{layer}"] = int(prev.argmax())
            out[f"induction_score_l{layer}"] = float(ind.max())
            out[f"induction_head_l{layer}"] = int(ind.argmax())
        later = [out[f"induction_score_l{layer}"] for layer in range(1, len(names))]
        score = max(later, default=0.0)
        out["induction_score"] = score
        out["mechanism_formed"] = score >= self.threshold
        if score < self.threshold:
            shown = math.floor(score * 100) / 100  # 0.695 shows as 0.69, not 0.70 < 0.70
            out["warning"] = (f"induction score {shown:.2f} < {self.threshold:.2f}: the "
                              "mechanism did not form; try more --steps")
        return out
