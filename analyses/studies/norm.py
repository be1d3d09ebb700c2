"""Pre- vs post-norm: depth, warm-up, divergence and the gradient norm per layer at init.

Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") prove that at
initialisation the expected gradient of the last layers' parameters is large for post-LN
(``x_{l+1} = LN(x_l + F(x_l))``) and does not shrink with depth, while for pre-LN
(``x_{l+1} = x_l + F(LN(x_l))``) it scales like 1/sqrt(L) and is about equal across layers; so
post-LN needs a learning-rate warm-up and pre-LN does not. This study measures exactly that on
one small model: per layer, the norm of the gradient of the loss with respect to that block's
parameters (and to its FFN output matrix, the W^{2,L} of their Theorem 1) at initialisation,
and for every (norm, depth, warm-up, seed) run of plain Adam without clipping: final loss,
whether it failed (final loss above the midpoint of the corpus' entropy rate and unigram
entropy: it learned less than half of what context can give; or a non-finite loss), loss
spikes and gradient norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analyses.studies.data import MarkovCorpus
from analyses.studies.loop import count_spikes, seeded, train_run
from interp.config import ModelConfig
from interp.errors import InterpError

__all__ = ["NORMS", "init_grad_norms", "norm_config", "norm_study", "summarise_norm_runs"]

NORMS = ("pre", "post")


def norm_config(corpus: MarkovCorpus, depth: int, placement: str, *, d_model: int = 64,
                n_heads: int = 4, seq_len: int = 64, init_std: float | None = None
                ) -> ModelConfig:
    """The study's model: a decoder with learned positions and LayerNorm, ``placement`` "pre"
    (with the final LayerNorm pre-LN needs) or "post" (no final norm: each block ends in one,
    as in Vaswani et al. 2017 and Xiong et al.'s Post-LN). ``init_std`` defaults to
    d_model ** -0.5, the Xavier-scale init Xiong et al.'s analysis assumes (GPT-2's 0.02 is
    far smaller at d_model 64 and changes which layers get the large gradients)."""
    if placement not in NORMS:
        raise InterpError(f"norm placement must be one of {', '.join(NORMS)}, got {placement!r}.")
    return ModelConfig(n_layers=depth, d_model=d_model, n_heads=n_heads, d_vocab=corpus.d_vocab,
                       n_ctx=seq_len, positional="learned", norm="layernorm",
                       norm_placement=placement, final_norm=placement == "pre", act="gelu",
                       init_std=init_std if init_std is not None else d_model ** -0.5)


def next_token_loss(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of the window."""
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def init_grad_norms(model: Any, tokens: Sequence[torch.Tensor]) -> pd.DataFrame:
    """Per layer: the gradient norm of the next-token loss with respect to the block's
    parameters (``grad_block``) and to its FFN output matrix (``grad_ffn_out``), each the mean
    over ``tokens`` batches (one backward each), at the model's current (initial) weights."""
    n = model.cfg.n_layers
    block = np.zeros(n)
    ffn = np.zeros(n)
    model.train()
    for batch in tokens:
        model.zero_grad(set_to_none=True)
        next_token_loss(model, batch).backward()
        for layer, blk in enumerate(model.blocks):
            grads = [p.grad.norm() for p in blk.parameters() if p.grad is not None]
            block[layer] += float(torch.stack(grads).norm())
            ffn[layer] += float(blk.mlp.fc_out.weight.grad.norm())
    model.zero_grad(set_to_none=True)
    model.eval()
    k = len(tokens)
    return pd.DataFrame({"layer": np.arange(n), "grad_block": block / k, "grad_ffn_out": ffn / k})


def _check(depths: Sequence[int], seeds: Sequence[int], steps: int, warmups: Sequence[int]
           ) -> None:
    if not depths or any(not isinstance(d, int) or d < 1 for d in depths):
        raise InterpError(f"depths must be positive integers, got {list(depths)!r}.")
    if not seeds:
        raise InterpError("seeds must name at least one seed, e.g. 0,1,2.")
    if not warmups or any(not isinstance(w, int) or w < 0 for w in warmups):
        raise InterpError(f"warmups must be integers >= 0, got {list(warmups)!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise InterpError(f"steps must be a positive integer, got {steps!r}.")


# Long because it is the study's grid: four nested conditions and three tables, in one place.
def norm_study(
    depths: Sequence[int] = (2, 6, 12, 24),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    warmups: Sequence[int] = (0, 100),
    *,
    lr: float = 2e-3,
    batch_size: int = 16,
    seq_len: int = 64,
    d_model: int = 64,
    n_heads: int = 4,
    grad_batches: int = 4,
    corpus: MarkovCorpus | None = None,
    progress: Callable[..., Iterable] | None = None,
) -> dict[str, pd.DataFrame]:
    """Train every (norm, depth, warm-up, seed) and return the study's tables.

    ``norm_runs``: one row per run (``norm, depth, warmup, seed, initial_loss, final_loss``
    (mean of the last 10% of steps), ``failed, nonfinite, spikes, max_grad_norm,
    mean_grad_norm``); ``norm_init_grads``: per (norm, depth, seed, layer) the gradient norms
    at initialisation (``grad_block, grad_ffn_out``, and ``rel_layer`` = layer / (depth - 1));
    ``norm_history``: the loss and gradient norm of every step of every run; ``norm_floors``:
    the corpus' entropy rate and unigram entropy. Same arguments, same tables.
    """
    _check(depths, seeds, steps, warmups)
    corpus = corpus or MarkovCorpus()
    unigram = corpus.unigram_entropy()
    # failed: less than half the way from the context-free loss to the floor (post-LN stuck
    # runs sit a few hundredths below unigram, so "below unigram" alone would call them fine)
    threshold = 0.5 * (unigram + corpus.entropy_rate())
    grid = [(n, d, w, s) for n in NORMS for d in depths for w in warmups for s in seeds]
    it = progress(grid, desc="norm study", total=len(grid)) if progress else grid
    runs, inits, hist = [], [], []
    init_done: set[tuple[str, int, int]] = set()
    for norm, depth, warmup, seed in it:
        cfg = norm_config(corpus, depth, norm, d_model=d_model, n_heads=n_heads, seq_len=seq_len)

        def build(cfg: ModelConfig = cfg) -> Any:
            from interp.model import HookedTransformer

            return HookedTransformer(cfg)

        model = seeded(seed, build)
        if (norm, depth, seed) not in init_done:  # the init is the same for every warm-up
            init_done.add((norm, depth, seed))
            g = torch.Generator().manual_seed(10_000 + seed)
            batches = [corpus.sample(batch_size, seq_len, g) for _ in range(grad_batches)]
            df = init_grad_norms(model, batches)
            df.insert(0, "seed", seed)
            df.insert(0, "depth", depth)
            df.insert(0, "norm", norm)
            df["rel_layer"] = df["layer"] / max(depth - 1, 1)
            inits.append(df)
        run = train_run(model, next_token_loss,
                        lambda gen: corpus.sample(batch_size, seq_len, gen),
                        steps=steps, lr=lr, warmup=warmup, seed=seed)
        h = run.history
        tail = h["loss"].iloc[-max(1, steps // 10):]
        final = float(tail.mean()) if not run.nonfinite else float("nan")
        runs.append({"norm": norm, "depth": depth, "warmup": warmup, "seed": seed,
                     "initial_loss": float(h["loss"].iloc[0]), "final_loss": final,
                     "failed": bool(run.nonfinite or not final < threshold),
                     "nonfinite": run.nonfinite, "spikes": count_spikes(h["loss"].to_numpy()),
                     "max_grad_norm": float(h["grad_norm"].max()),
                     "mean_grad_norm": float(h["grad_norm"].mean())})
        hist.append(h.assign(norm=norm, depth=depth, warmup=warmup, seed=seed))
    floors = pd.DataFrame([{"entropy_rate": corpus.entropy_rate(), "unigram_entropy": unigram,
                            "failure_threshold": threshold, "uniform": corpus.chance_nats()}])
    history = pd.concat(hist, ignore_index=True)[
        ["norm", "depth", "warmup", "seed", "step", "loss", "grad_norm", "lr"]]
    return {"norm_runs": pd.DataFrame(runs), "norm_init_grads": pd.concat(inits, ignore_index=True),
            "norm_history": history, "norm_floors": floors}


def summarise_norm_runs(runs: pd.DataFrame, init_grads: pd.DataFrame) -> pd.DataFrame:
    """Per (norm, depth, warmup): failure rate, final loss (mean, std over seeds), spikes, and
    the init gradient norm of the last layer's block over the first layer's (Xiong et al.:
    large for post-LN, about 1 for pre-LN)."""
    agg = runs.groupby(["norm", "depth", "warmup"], as_index=False).agg(
        runs=("seed", "size"), failure_rate=("failed", "mean"),
        final_loss=("final_loss", "mean"), final_loss_std=("final_loss", "std"),
        spikes=("spikes", "mean"), max_grad_norm=("max_grad_norm", "mean"))
    g = init_grads.groupby(["norm", "depth", "seed"])
    last = g.apply(lambda d: d.sort_values("layer")["grad_block"].iloc[-1]
                   / d.sort_values("layer")["grad_block"].iloc[0], include_groups=False)
    ratio = last.rename("init_grad_last_over_first").reset_index().groupby(
        ["norm", "depth"], as_index=False)["init_grad_last_over_first"].mean()
    return agg.merge(ratio, on=["norm", "depth"], how="left")
