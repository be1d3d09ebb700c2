"""Train SAEs and transcoders on recorded activations, small and on the CPU.

The activations are either read with ``run_with_cache`` (:func:`collect_activations`), one
batch at a time with only the named hook recorded, and kept as one [tokens, d_in] matrix (for
budgets that fit in memory), or streamed from an on-disk store written by ``interp
activations`` (:mod:`analyses.dictionary.stream`: shuffled passes over its shards, memory one
reading window, any size). Losses, per architecture:

- ``relu``: ``||x - x_hat||^2 + l1 * sum_i f_i ||W_dec,i||`` (Bricken et al. 2023, with the
  decoder-norm weighting of Anthropic's April 2024 update so the penalty cannot be dodged by
  shrinking features and growing decoder rows);
- ``topk``: the reconstruction error alone (Gao et al. 2024: k fixes the sparsity);
- ``jumprelu``: reconstruction + ``l0 * L0`` through straight-through estimates
  (Rajamanoharan et al. 2024).

Reconstruction error is the squared error summed over the d_in dimensions, averaged over
tokens, divided by the data's mean squared norm, so one ``l1`` means the same at every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pandas as pd
import torch

from analyses.dictionary.sae import SAE, SAEConfig
from analyses.dictionary.stream import StoreSplit
from interp.activation_store import ActivationStore
from interp.errors import InterpError

__all__ = ["collect_activations", "train_sae"]

_Source = tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]


@torch.no_grad()
def collect_activations(model: object, hook_names: str | list[str],
                        batches: Iterable[torch.Tensor], *, max_tokens: int | None = None,
                        drop_first: bool = True) -> list[torch.Tensor]:
    """Activations at each of ``hook_names`` as [tokens, d] float32 CPU matrices, row-aligned.

    ``drop_first`` leaves out each sequence's first position: the BOS/first-token residual is
    huge and unlike every other (an "attention sink", Xiao et al. 2023), and SAEs trained with
    it spend features on it (SAELens' ``exclude_special_tokens`` serves the same purpose).
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    model.check_hook_names(names)  # type: ignore[attr-defined]
    out: list[list[torch.Tensor]] = [[] for _ in names]
    seen = 0
    for tokens in batches:
        _, cache = model.run_with_cache(tokens, names_filter=names)  # type: ignore[attr-defined]
        for i, n in enumerate(names):
            a = cache[n]
            a = a[:, 1:] if drop_first and a.shape[1] > 1 else a
            out[i].append(a.reshape(-1, a.shape[-1]).float().cpu())
        seen += out[0][-1].shape[0]
        if max_tokens is not None and seen >= max_tokens:
            break
    if not out[0]:
        raise InterpError("No activations were recorded: the corpus gave no batches; pass "
                          "more text or a larger --max-tokens.")
    return [torch.cat(chunks)[:max_tokens] for chunks in out]


def _source(acts: torch.Tensor | ActivationStore | StoreSplit, cfg: SAEConfig,
            targets: torch.Tensor | None, batch_size: int, seed: int) -> _Source:
    """(next batch, mean of the targets, their mean squared norm) for in-memory rows or a
    store: in memory, rows drawn uniformly with replacement; from a store, shuffled passes
    over its shards (:meth:`StoreSplit.batches`), memory one reading window."""
    if isinstance(acts, ActivationStore):
        if not cfg.hook_name:
            raise InterpError("Training from a store needs the SAE's hook_name (the stored "
                              "tensor to read); set SAEConfig(hook_name=...).")
        acts = StoreSplit(acts, cfg.hook_name, cfg.hook_name_out)
    if isinstance(acts, StoreSplit):
        if targets is not None:
            raise InterpError("A store holds the transcoder's targets itself: pass its hook as "
                              "hook_name_out, not targets=.")
        for hook, want in ((acts.hook_name, cfg.d_in), (acts.hook_names[-1], cfg.d_in)):
            if acts.width(hook) != want:
                raise InterpError(f"{hook} in {acts.store.path} has width {acts.width(hook)} "
                                  f"but the SAE's d_in is {want}; set d_in={acts.width(hook)}.")
        mean, sq, _ = acts.moments()
        stream = acts.batches(batch_size, shuffle=True, seed=seed, cycle=True)

        def next_from_store() -> tuple[torch.Tensor, torch.Tensor]:
            b = next(stream)
            return b["x"], b["y"]

        return next_from_store, mean, torch.tensor(sq)
    if acts.ndim != 2 or acts.shape[1] != cfg.d_in:
        raise InterpError(f"Training activations must be [tokens, d_in={cfg.d_in}], got "
                          f"{list(acts.shape)}; set d_in to the hook's width.")
    y_all = acts if targets is None else targets
    if y_all.shape != acts.shape:
        raise InterpError(f"Transcoder targets {list(y_all.shape)} must match the inputs "
                          f"{list(acts.shape)} (one output row per input row).")
    gen = torch.Generator().manual_seed(seed)
    x_all = acts

    def next_in_memory() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        return x_all[idx], y_all[idx]

    return next_in_memory, y_all.mean(0), y_all.pow(2).sum(-1).mean()


def train_sae(
    acts: torch.Tensor | ActivationStore | StoreSplit,
    cfg: SAEConfig,
    *,
    targets: torch.Tensor | None = None,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 3e-3,
    l1: float = 1.0,
    l0: float = 0.01,
    seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> tuple[SAE, pd.DataFrame]:
    """Train an SAE (``targets=None``) or a transcoder (predict ``targets`` from ``acts``).

    ``acts``: a [tokens, d_in] matrix, or an on-disk store (``interp activations``): an
    :class:`~interp.activation_store.ActivationStore` read at ``cfg.hook_name`` (a
    transcoder's targets at ``cfg.hook_name_out``, every row but each sequence's first), or a
    :class:`~analyses.dictionary.stream.StoreSplit` for one split of it. A store is streamed
    shard by shard in shuffled passes, so memory does not grow with its size.

    Returns the SAE, with unit-norm decoder rows, and its history (columns ``step``, ``loss``,
    ``mse``, ``l0``), one row per 1% of the steps. ``l1`` is the ReLU SAE's sparsity weight,
    ``l0`` JumpReLU's; TopK needs neither. Deterministic for a given ``seed``.
    """
    draw, mean, scale = _source(acts, cfg, targets, batch_size, seed)
    sae = SAE(cfg, seed=seed)
    with torch.no_grad():
        sae.b_dec.copy_(mean)  # start from the mean, so features model deviations
    scale = scale.clamp_min(1e-12)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * min(1.0, 5 * (steps - s) / steps))
    rows = []
    every = max(1, steps // 100)
    it: Iterable[int] = range(steps)
    if progress is not None:
        it = progress(it, desc=f"train {cfg.architecture} SAE", total=steps)
    for step in it:
        x, y = draw()
        f = sae.encode(x)
        mse = (sae.decode(f) - y).pow(2).sum(-1).mean() / scale
        loss = mse
        # ramp the sparsity weight in over the first 5% (SAELens' l1_warm_up_steps): features
        # first find directions, then are made sparse
        ramp = min(1.0, (step + 1) / warm)
        if cfg.architecture == "relu":
            loss = mse + ramp * l1 * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean() / scale.sqrt()
        elif cfg.architecture == "jumprelu":
            loss = mse + ramp * l0 * sae.l0_penalty(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.architecture != "relu":
            sae.normalize_decoder()
        if step % every == 0 or step == steps - 1:
            rows.append({"step": step, "loss": loss.item(), "mse": mse.item(),
                         "l0": float((f > 0).float().sum(-1).mean())})
    sae.normalize_decoder()
    sae.eval()
    return sae, pd.DataFrame(rows)
