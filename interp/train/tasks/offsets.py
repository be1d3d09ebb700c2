"""The ``offsets`` task: name the tokens k1, k2, .. positions back, one head per offset.

It plants a known span per head for adaptive attention span (Sukhbaatar et al. 2019): the
answer at a marker is the tuple of the tokens exactly k positions before it, for every k of
``offsets``, so each offset needs a head of its own with a span of k and no more.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InterpError
from interp.tokenizers import WordTokenizer
from interp.train.tasks.base import Batch, Task, float_param, int_param

__all__ = ["Offsets"]


class Offsets(Task):
    """``[BOS] x1 .. xn`` of uniform data tokens, some replaced by the marker ``<ask>``.

    At a marker at position t the target (the label of the logits at t) is one answer token
    naming the tuple ``(x[t - k1], x[t - k2], ..)`` for the task's ``offsets`` k1 < k2 < ..;
    nowhere else is a loss taken (the data tokens are unpredictable). Why one head per offset:
    in a one-layer attention-only model with RoPE the values carry no position, so a head
    attending to two offsets hands the unembedding a mixture that cannot tell (a, b) from
    (b, a); separate heads, one attending exactly k back each, add up to the answer's logit
    (the answer's unembedding is a sum over the tuple). With an L1 penalty on spans each
    head's span shrinks to the offset it serves, and a head serving none to 0.

    Markers appear only from position ``max(offsets) + 1`` on, and a marker with another
    marker at one of its offsets takes no loss. Vocabulary: ``<bos>`` = 0, ``t0``..
    ``t{n_tokens-1}``, ``<ask>``, then the answers ``a0``.. (``n_tokens ** len(offsets)``).
    """

    name = "offsets"
    mechanism = "one head per offset k attends k back from the marker (Sukhbaatar et al. 2019)"
    defaults = {"n_tokens": 4, "offsets": [2, 5, 10], "seq_len": 32, "marker_prob": 0.15}
    model_defaults = {"n_layers": 1, "d_model": 64, "n_heads": 4, "attn_only": True,
                      "positional": "rope", "adaptive_span": True, "span_ramp": 2}
    train_defaults = {"steps": 800, "batch_size": 32, "lr": 3e-3}

    def _validate(self) -> None:
        p = self.params
        int_param("n_tokens", p["n_tokens"], 2, 16)
        int_param("seq_len", p["seq_len"], 4, 4096)
        float_param("marker_prob", p["marker_prob"], 0.0, 1.0)
        offs = p["offsets"]
        if (not isinstance(offs, list | tuple) or not 1 <= len(offs) <= 4
                or len(set(offs)) != len(offs)):
            raise InterpError(f"Task parameter offsets must be a list of 1 to 4 distinct "
                              f"positive integers, got {offs!r}.")
        for k in offs:
            int_param("offsets entry", k, 1, p["seq_len"] - 2)
        self.params["offsets"] = sorted(int(k) for k in offs)

    def _build_tokenizer(self) -> WordTokenizer:
        n = self.params["n_tokens"] ** len(self.params["offsets"])
        data = [f"t{i}" for i in range(self.params["n_tokens"])]
        return WordTokenizer(["<bos>", *data, "<ask>", *(f"a{i}" for i in range(n))])

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    @property
    def marker_id(self) -> int:
        """Token id of ``<ask>``."""
        return 1 + self.params["n_tokens"]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        p = self.params
        V, T, offs = p["n_tokens"], p["seq_len"], p["offsets"]
        tokens = torch.randint(1, V + 1, (batch_size, T), generator=generator)
        tokens[:, 0] = 0
        is_marker = torch.rand(batch_size, T, generator=generator) < p["marker_prob"]
        is_marker[:, : max(offs) + 1] = False
        tokens = tokens.masked_fill(is_marker, self.marker_id)
        answer = torch.zeros_like(tokens)
        keep = is_marker.clone()
        for k in offs:  # answer = sum_i x[t - k_i] * V ** i (mixed radix)
            src = tokens.roll(k, dims=1)  # src[:, t] = tokens[:, t - k] (wraps only where t < k)
            keep &= (src >= 1) & (src <= V)
            answer = answer * V + (src - 1).clamp(0, V - 1)
        labels = torch.where(keep, answer + self.marker_id + 1, torch.full_like(tokens, -100))
        return Batch(tokens, labels)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345, batch_size: int = 64) -> dict[str, Any]:
        """Loss and accuracy at the markers, and which head serves each offset (layer 0).

        ``head_k{k}``: the head with the most attention from the markers to t - k
        (``attn_k{k}``, its mean); ``needed_span_h{h}``: the largest offset head h serves
        (mean attention >= 0.3 to t - k), 0 for a head serving none.
        """
        batch = self.sample(batch_size, torch.Generator().manual_seed(seed))
        dev = next(model.parameters()).device
        tokens, labels = batch.tokens.to(dev), batch.labels.to(dev)
        name = "blocks.0.attn.hook_pattern"
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
        pat = cache[name].float()  # [batch, head, q, k]
        b, t = torch.nonzero(labels >= 0, as_tuple=True)
        nll = F.cross_entropy(logits[b, t].float(), labels[b, t])
        acc = (logits[b, t].argmax(-1) == labels[b, t]).float().mean()
        out: dict[str, Any] = {"loss": float(nll), "accuracy": float(acc)}
        needed = [0] * model.cfg.n_heads
        for k in self.params["offsets"]:
            attn = pat[b, :, t, t - k].mean(0)  # [head]
            out[f"head_k{k}"], out[f"attn_k{k}"] = int(attn.argmax()), float(attn.max())
            for h in range(model.cfg.n_heads):
                if attn[h] >= 0.3:
                    needed[h] = max(needed[h], k)
        out.update({f"needed_span_h{h}": n for h, n in enumerate(needed)})
        return out
