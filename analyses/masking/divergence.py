"""Compare masking strategies with the model's own run: output KL, loss, attention shifts.

For every batch the model runs once as it is (the baseline) and once per
:class:`~analyses.masking.strategies.Strategy` with the same weights. Measured per strategy:
KL(P_baseline || P_strategy) of the next-token (or masked-token) distributions, the loss
change, the last residual stream's cosine change (the output change of a model without an LM
head), and per head the Jensen-Shannon divergence of the attention rows (Lin 1991, *Divergence
measures based on the Shannon entropy*), the entropy and mean attention distance shifts. A soft
strategy is also compared with the hard mask it softens: its KL there must fall to 0 as the
penalty grows. Memory: one batch's baseline patterns (``n_layers x batch x heads x pos^2``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from analyses import distributed
from analyses.masking.data import _ce_per_seq, _strategy_labels, _token_mask, layer_of
from analyses.masking.strategies import Strategy, base_mask
from interp import HookedTransformer
from interp.errors import InterpError
from interp.masks import MaskSpec
from interp.progress import Progress, no_progress

__all__ = ["compare_strategies"]


def _pattern_stats(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head sums over batch and queries of entropy (nats) and mean attention distance."""
    T_q, T_k = p.shape[-2:]
    q, k = torch.arange(T_q, device=p.device), torch.arange(T_k, device=p.device)
    dist = (q[:, None] - k[None, :]).abs().to(p.dtype)
    ent = -torch.xlogy(p, p).sum(-1)  # [batch, head, q]
    d = (p * dist).sum(-1)
    return ent.sum((0, 2)).double(), d.sum((0, 2)).double()


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (bits, in [0, 1]) between attention rows; sum over batch and
    queries per head (Lin 1991)."""
    m = 0.5 * (p + q)
    js = (0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
          + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1))
    return (js.clamp(min=0) / math.log(2)).sum((0, 2)).double()


class _Acc:
    """Running sums for one strategy (all of them sums or counts, so they add over ranks)."""

    SUMS = ("kl", "kl_hard", "cos", "cos_hard", "loss", "n_pos", "n_loss", "n_rows", "js", "ent",
            "dist")

    def __init__(self, L: int, H: int):
        self.kl = self.kl_hard = self.cos = self.cos_hard = self.loss = 0.0
        self.n_pos = self.n_loss = self.n_rows = 0
        self.js = torch.zeros(L, H, dtype=torch.float64)
        self.ent = torch.zeros(L, H, dtype=torch.float64)
        self.dist = torch.zeros(L, H, dtype=torch.float64)

    def add_loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is not None:
            s, n = _ce_per_seq(logits, labels)
            self.loss += float(s.double().sum())
            self.n_loss += int(n.sum())


def _kl_sum(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """sum over positions of KL(P_base || P), computed in float64."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).sum())


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum over positions of 1 - cosine similarity."""
    return float((1 - F.cosine_similarity(a.double(), b.double(), dim=-1)).clamp(min=0).sum())


def _is_pattern(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


class _Runner:
    """One baseline run and one run per strategy on each batch, with the hooks that feed the
    running sums (patterns are reduced on the fly; only the baseline's are kept, per batch)."""

    def __init__(self, model: HookedTransformer, strategies: Sequence[Strategy], seed: int):
        cfg = model.cfg
        self.model, self.strategies = model, strategies
        self.accs = {s: _Acc(cfg.n_layers, cfg.n_heads) for s in strategies}
        self.base = _Acc(cfg.n_layers, cfg.n_heads)
        self.has_head = bool(cfg.has_unembed)
        self.last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        self.gen = torch.Generator().manual_seed(seed)
        self.base_pats: dict[int, torch.Tensor] = {}  # this batch's baseline patterns, per layer
        self.resid: dict[str, torch.Tensor] = {}  # the last run's final residual stream

    def _keep_resid(self, t: torch.Tensor, hook: object) -> None:
        self.resid["x"] = t.detach()

    def _save(self, t: torch.Tensor, hook: object) -> None:
        p = t.detach().float()
        layer = layer_of(hook.name)
        self.base_pats[layer] = p
        e, d = _pattern_stats(p)
        self.base.ent[layer] += e
        self.base.dist[layer] += d

    def _stats(self, t: torch.Tensor, hook: object, acc: _Acc) -> None:
        layer = layer_of(hook.name)
        p = t.detach().float()
        acc.js[layer] += _js_bits(self.base_pats[layer], p)
        e, d = _pattern_stats(p)
        acc.ent[layer] += e
        acc.dist[layer] += d

    def _run(self, tokens: torch.Tensor, hooks: list) -> torch.Tensor | None:
        kind = "logits" if self.has_head else None
        return self.model.run_with_hooks(tokens, return_type=kind, fwd_hooks=hooks)

    def batch(self, tokens: torch.Tensor, index: int = 0) -> None:
        """Baseline, then every strategy (and each soft strategy's hard mask, once).

        In a distributed run (:mod:`analyses.distributed`) every rank runs the baseline of
        every batch (the strategies' JS needs its patterns) and only its round-robin share of
        the (batch ``index``, strategy) pairs; a token-masking strategy another rank runs still
        draws its masks here, so the seeded stream of masks is the one-process stream."""
        model, base = self.model, self.base
        labels = _strategy_labels(model, tokens)
        self.base_pats.clear()
        base_out = self._run(tokens, [(_is_pattern, self._save), (self.last, self._keep_resid)])
        base_resid = self.resid["x"]
        B, T = tokens.shape
        base.n_rows += B * T
        base.n_pos += B * T
        base.add_loss(base_out, labels)
        hard_refs: dict[MaskSpec, tuple[torch.Tensor | None, torch.Tensor]] = {}
        n_strat = len(self.strategies)
        for j, strat in enumerate(self.strategies):
            acc = self.accs[strat]
            inputs = tokens
            if strat.token_mask_rate is not None:
                inputs, _ = _token_mask(model, tokens, strat.token_mask_rate, self.gen)
            if not distributed.mine(index * n_strat + j):
                continue
            stats = functools.partial(self._stats, acc=acc)
            with strat.applied(model):
                out = self._run(inputs, [(_is_pattern, stats), (self.last, self._keep_resid)])
            strat_resid = self.resid["x"]
            acc.n_rows += B * T
            acc.n_pos += B * T
            acc.cos += _cos_sum(base_resid, strat_resid)
            if self.has_head:
                acc.kl += _kl_sum(base_out, out)
            acc.add_loss(out, labels)
            hard = strat.hard_mask
            if hard is not None:
                ref = self._hard_ref(tokens, hard, (base_out, base_resid), hard_refs)
                acc.cos_hard += _cos_sum(ref[1], strat_resid)
                if self.has_head:
                    acc.kl_hard += _kl_sum(ref[0], out)

    def _hard_ref(self, tokens: torch.Tensor, hard: MaskSpec, baseline: tuple, refs: dict) -> tuple:
        """(logits, final residual) under the hard mask: the baseline's when it is the model's
        own mask, else one extra run per distinct mask and batch."""
        if hard == base_mask(self.model):
            return baseline
        if hard not in refs:
            with self.model.override_attention(mask=hard):
                ref_out = self._run(tokens, [(self.last, self._keep_resid)])
            refs[hard] = (ref_out, self.resid["x"])
        return refs[hard]


def _strategy_row(strat: Strategy, acc: _Acc, base_ent: torch.Tensor, base_dist: torch.Tensor,
                  base_loss: float, has_head: bool, H: int) -> dict:
    nan = float("nan")
    js, ent, dist = acc.js / acc.n_rows, acc.ent / acc.n_rows, acc.dist / acc.n_rows
    loss = acc.loss / acc.n_loss if acc.n_loss else nan
    order = torch.argsort(js.flatten(), descending=True)[:3]
    top = ", ".join(f"L{int(i) // H}H{int(i) % H} ({float(js.flatten()[i]):.2f})" for i in order)
    soft = strat.hard_mask is not None
    return {
        "strategy": strat.name, "parameter": nan if strat.parameter is None else strat.parameter,
        "label": strat.label, "mask": strat.describe(),
        "kl": acc.kl / acc.n_pos if has_head else nan,
        "kl_to_hard": acc.kl_hard / acc.n_pos if (soft and has_head) else nan,
        "loss": loss, "loss_delta": loss - base_loss,
        "hidden_cos_delta": acc.cos / acc.n_pos,
        "hidden_cos_delta_to_hard": acc.cos_hard / acc.n_pos if soft else nan,
        "mean_js": float(js.mean()), "max_js": float(js.max()),
        "entropy": float(ent.mean()), "entropy_delta": float((ent - base_ent).mean()),
        "distance": float(dist.mean()), "distance_delta": float((dist - base_dist).mean()),
        "top_heads": top,
    }


def _head_rows(strat: Strategy, parameter: float, acc: _Acc, base_ent: torch.Tensor,
               base_dist: torch.Tensor) -> list[dict]:
    js, ent, dist = acc.js / acc.n_rows, acc.ent / acc.n_rows, acc.dist / acc.n_rows
    L, H = js.shape
    return [{
        "strategy": strat.name, "parameter": parameter, "label": strat.label,
        "layer": layer, "head": h, "js": float(js[layer, h]),
        "entropy": float(ent[layer, h]),
        "entropy_delta": float(ent[layer, h] - base_ent[layer, h]),
        "distance": float(dist[layer, h]),
        "distance_delta": float(dist[layer, h] - base_dist[layer, h]),
    } for layer in range(L) for h in range(H)]


def _tables(runner: _Runner) -> tuple[pd.DataFrame, pd.DataFrame]:
    nan = float("nan")
    base, has_head = runner.base, runner.has_head
    base_loss = base.loss / base.n_loss if base.n_loss else nan
    base_ent = base.ent / base.n_rows
    base_dist = base.dist / base.n_rows
    rows = [{
        "strategy": "baseline", "parameter": nan, "label": "baseline",
        "mask": f"mask {base_mask(runner.model)} (the model's own)",
        "kl": 0.0 if has_head else nan, "kl_to_hard": nan, "loss": base_loss,
        "loss_delta": 0.0 if base.n_loss else nan,
        "hidden_cos_delta": 0.0, "hidden_cos_delta_to_hard": nan, "mean_js": 0.0, "max_js": 0.0,
        "entropy": float(base_ent.mean()), "entropy_delta": 0.0,
        "distance": float(base_dist.mean()), "distance_delta": 0.0, "top_heads": "",
    }]
    head_rows = []
    H = runner.model.cfg.n_heads
    for strat, acc in runner.accs.items():
        rows.append(_strategy_row(strat, acc, base_ent, base_dist, base_loss, has_head, H))
        head_rows += _head_rows(strat, rows[-1]["parameter"], acc, base_ent, base_dist)
    return pd.DataFrame(rows), pd.DataFrame(head_rows)


@torch.no_grad()
def compare_strategies(model: HookedTransformer, batches: Iterable[torch.Tensor],
                       strategies: Sequence[Strategy], *, seed: int = 0,
                       progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every strategy on every batch with the same weights and compare with the baseline.

    Returns ``(strategies, heads)``:

    - ``strategies``, one row per strategy plus the baseline: ``strategy, parameter, label,
      mask`` (what was run), ``kl`` (mean over positions of KL(P_baseline || P_strategy), nats;
      NaN without an LM head), ``kl_to_hard`` (soft strategies: KL(P_hard || P_soft) to the hard
      mask the penalty softens), ``loss, loss_delta`` (next-token cross-entropy for decoders,
      original-token cross-entropy for encoders with an LM head; NaN without one),
      ``hidden_cos_delta`` (mean 1 - cosine of the last layer's residual stream to the
      baseline's: the output change for a model without LM head), ``hidden_cos_delta_to_hard``,
      ``mean_js`` / ``max_js`` (Jensen-Shannon divergence of attention rows, bits, averaged over
      queries, then mean / max over heads), ``entropy, entropy_delta`` (attention entropy,
      nats), ``distance, distance_delta`` (mean attention distance |q - k| in positions),
      ``top_heads`` (the three heads with the largest JS).
    - ``heads``, one row per strategy, layer and head: ``js, entropy, entropy_delta, distance,
      distance_delta``.

    Batches are equal-length token tensors [batch, pos]; a strategy that equals the model's own
    mask gives exactly zero everywhere (both runs use the eager kernel). In a distributed run
    every rank passes the same batches, runs its share of the (batch, strategy) pairs, and the
    sums are added over the ranks before any mean is taken: the one-process tables.
    """
    runner = _Runner(model, strategies, seed)
    n_batches = 0
    for tokens in (progress or no_progress)(batches, desc="masking strategies"):
        runner.batch(tokens.to(model.device), n_batches)
        n_batches += 1
    if n_batches == 0:
        raise InterpError("No batches to compare strategies on; pass some text.")
    for acc in runner.accs.values():  # each rank's share of the (batch, strategy) pairs
        distributed.reduce_sums(acc, _Acc.SUMS)
    return _tables(runner)
