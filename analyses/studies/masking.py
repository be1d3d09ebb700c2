"""Masking strategies in training: one model, one corpus, five ways of hiding tokens.

The same small decoder (same size, same seeds, same Markov corpus, same Adam steps) is trained
under each strategy of :data:`STRATEGIES`, then every trained model is asked the same two
questions on held-out windows:

- **next token**: the window without its last token, predict that token from the last position
  (the masked-LM model gets a ``[MASK]`` appended and predicts it there);
- **cloze**: the middle token blanked, predict it. The masked-LM model sees ``[MASK]`` there and
  both sides; a left-to-right model can only answer from the left context (its prediction at
  the position before the blank, the window cut there), so the cloze gap measures what a
  bidirectional objective buys.

Inputs are cut before the target, so no mask, soft or not, can leak the answer at evaluation.
The chain's Bayes accuracies (:meth:`MarkovCorpus.bayes_next_accuracy`, ``bayes_cloze_accuracy``)
are the ceilings. Stability: loss spikes (:func:`analyses.studies.loop.count_spikes`) and the
global gradient norm per step. Training losses are each strategy's own objective (masked-LM
scores 15% of positions, prefix-LM the second half), so compare them within a strategy, and
compare strategies on the two accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from analyses.studies.data import MarkovCorpus
from analyses.studies.loop import count_spikes, seeded, train_run
from interp.config import ModelConfig
from interp.errors import InterpError

__all__ = ["STRATEGIES", "masking_study", "mlm_corrupt", "strategy_config"]

#: strategy -> what it is (the report's table of conditions)
STRATEGIES = {
    "causal": "causal mask, next-token loss at every position (GPT; Radford et al. 2018)",
    "mlm": "bidirectional, 15% of positions chosen: 80% [MASK], 10% random, 10% kept; loss on "
           "the chosen ones (BERT; Devlin et al. 2019)",
    "prefix": "bidirectional over the first half, causal after; next-token loss on the second "
              "half (prefix-LM; Raffel et al. 2020)",
    "soft": "causal mask made soft: future keys get a finite penalty (-5) instead of -inf, "
            "scores divided by a temperature of 1.5",
    "learned": "causal with a learned span per head (Sukhbaatar et al. 2019, L1 penalty 0.1) "
               "and selective attention (Leviathan et al. 2024)",
}
SOFT_PENALTY, SOFT_TEMPERATURE, SPAN_COEF = 5.0, 1.5, 0.1


def strategy_config(strategy: str, corpus: MarkovCorpus, *, n_layers: int = 2,
                    d_model: int = 64, n_heads: int = 4, seq_len: int = 32) -> ModelConfig:
    """The one model, configured for ``strategy`` (only the mask fields differ)."""
    from interp.masks import prefix_lm

    if strategy not in STRATEGIES:
        raise InterpError(f"Unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
    base = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=corpus.d_vocab,
                n_ctx=seq_len, positional="learned")
    extra: dict[str, Any] = {
        "causal": {},
        "mlm": {"mask": "bidirectional"},
        "prefix": {"mask": prefix_lm(seq_len // 2)},
        "soft": {"soft_mask_penalty": SOFT_PENALTY, "attn_temperature": SOFT_TEMPERATURE},
        "learned": {"adaptive_span": True, "span_ramp": 4, "selective_attention": True},
    }[strategy]
    return ModelConfig(**base, **extra)


def mlm_corrupt(tokens: torch.Tensor, corpus: MarkovCorpus, gen: torch.Generator,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: ``rate`` of positions chosen; of those 80% become ``[MASK]``, 10% a
    random token, 10% stay. Returns (inputs, labels) with labels -100 where not chosen."""
    chosen = torch.rand(tokens.shape, generator=gen) < rate
    u = torch.rand(tokens.shape, generator=gen)
    rand_tok = torch.randint(0, corpus.vocab, tokens.shape, generator=gen)
    inputs = tokens.clone()
    inputs[chosen & (u < 0.8)] = corpus.mask_id
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = rand_tok[swap]
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return inputs, labels


def _loss_fn(strategy: str, corpus: MarkovCorpus, seq_len: int
             ) -> Callable[[Any, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    def loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss


def _batches(strategy: str, corpus: MarkovCorpus, batch_size: int, seq_len: int
             ) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels aligned with the logits) for the strategy's objective."""
    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        toks = corpus.sample(batch_size, seq_len, gen)
        if strategy == "mlm":
            return mlm_corrupt(toks, corpus, gen)
        labels = torch.cat([toks[:, 1:], torch.full_like(toks[:, :1], -100)], dim=1)
        if strategy == "prefix":  # only predictions of second-half tokens are scored
            labels[:, : seq_len // 2 - 1] = -100
        return toks, labels
    return draw


@torch.no_grad()
def evaluate_strategy(model: Any, strategy: str, corpus: MarkovCorpus, seq_len: int,
                      n: int = 512, seed: int = 999) -> dict[str, float]:
    """Next-token and cloze accuracy (and next-token loss) on ``n`` held-out windows."""
    toks = corpus.sample(n, seq_len, torch.Generator().manual_seed(seed))
    mid = seq_len // 2
    mask_col = torch.full_like(toks[:, :1], corpus.mask_id)
    if strategy == "mlm":
        nxt = model(torch.cat([toks[:, :-1], mask_col], dim=1))[:, -1]
        blank = toks.clone()
        blank[:, mid] = corpus.mask_id
        cloze = model(blank)[:, mid]
    else:
        nxt = model(toks[:, :-1])[:, -1]
        cloze = model(toks[:, :mid])[:, -1]
    nxt, cloze = nxt[:, : corpus.vocab].float(), cloze[:, : corpus.vocab].float()
    return {"next_token_accuracy": float((nxt.argmax(-1) == toks[:, -1]).float().mean()),
            "next_token_loss": float(F.cross_entropy(nxt, toks[:, -1])),
            "cloze_accuracy": float((cloze.argmax(-1) == toks[:, mid]).float().mean())}


def masking_study(
    strategies: Sequence[str] = tuple(STRATEGIES),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 400,
    *,
    lr: float = 1e-3,
    warmup: int = 40,
    batch_size: int = 16,
    seq_len: int = 32,
    n_layers: int = 2,
    d_model: int = 64,
    corpus: MarkovCorpus | None = None,
    progress: Callable[..., Iterable] | None = None,
) -> dict[str, pd.DataFrame]:
    """Train the model under every strategy and seed; return the study's tables.

    ``masking_runs``: one row per run (``strategy, seed, final_loss`` (own objective, last 10%
    of steps), ``spikes, max_grad_norm, mean_grad_norm, next_token_accuracy, next_token_loss,
    cloze_accuracy``); ``masking_history``: every step's loss and gradient norm;
    ``masking_ceilings``: the chain's Bayes accuracies. Same arguments, same tables.
    """
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise InterpError(f"Unknown or no strategies {bad or list(strategies)!r}; valid: "
                          f"{', '.join(STRATEGIES)}.")
    if not seeds:
        raise InterpError("seeds must name at least one seed, e.g. 0,1,2.")
    from interp.components.learned_masks import span_penalty
    from interp.model import HookedTransformer

    corpus = corpus or MarkovCorpus()
    grid = [(s, seed) for s in strategies for seed in seeds]
    it = progress(grid, desc="masking study", total=len(grid)) if progress else grid
    runs, hist = [], []
    for strategy, seed in it:
        cfg = strategy_config(strategy, corpus, n_layers=n_layers, d_model=d_model,
                              seq_len=seq_len)
        model = seeded(seed, lambda cfg=cfg: HookedTransformer(cfg))
        extra = (lambda m: SPAN_COEF * span_penalty(m)) if strategy == "learned" else None
        run = train_run(model, _loss_fn(strategy, corpus, seq_len),
                        _batches(strategy, corpus, batch_size, seq_len), steps=steps, lr=lr,
                        warmup=warmup, seed=seed, extra_loss=extra)
        h = run.history
        row = {"strategy": strategy, "seed": seed,
               "final_loss": float(h["loss"].iloc[-max(1, steps // 10):].mean()),
               "spikes": count_spikes(h["loss"].to_numpy()),
               "max_grad_norm": float(h["grad_norm"].max()),
               "mean_grad_norm": float(h["grad_norm"].mean()), "nonfinite": run.nonfinite}
        row.update(evaluate_strategy(run.model, strategy, corpus, seq_len))
        runs.append(row)
        hist.append(h.assign(strategy=strategy, seed=seed))
    ceilings = pd.DataFrame([{"bayes_next_token_accuracy": corpus.bayes_next_accuracy(),
                              "bayes_cloze_accuracy": corpus.bayes_cloze_accuracy(),
                              "entropy_rate": corpus.entropy_rate()}])
    history = pd.concat(hist, ignore_index=True)[
        ["strategy", "seed", "step", "loss", "grad_norm", "lr"]]
    return {"masking_runs": pd.DataFrame(runs), "masking_history": history,
            "masking_ceilings": ceilings}
