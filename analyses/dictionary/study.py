"""The two SAE studies a report shows: ground truth first, then a real model.

- :func:`toy_study`: train the toy model of superposition, an SAE of every architecture on its
  hidden activations, and measure how well each recovers the true feature directions.
- :func:`model_study`: record one hook of a model over a text, train (or load) an SAE or
  transcoder there, and state its L0, explained variance, dead/dense features, CE loss
  recovered (models with an LM head) and top-activating examples.
- :func:`store_study`: the same from activations stored on disk (``interp activations``),
  streamed shard by shard: train on 4 of every 5 documents, measure on the fifth.

Both return tidy DataFrames (and the trained SAE); they neither plot nor write files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from analyses.dictionary.metrics import (
    ce_loss_recovered,
    feature_frequencies,
    feature_recovery,
    reconstruction_stats,
    streaming_stats,
    top_examples,
)
from analyses.dictionary.sae import SAE, SAEConfig
from analyses.dictionary.stream import StoreSplit, store_top_examples
from analyses.dictionary.toy import train_toy_model
from analyses.dictionary.train import collect_activations, train_sae
from analyses.masking.data import text_to_batches
from interp.activation_store import ActivationStore
from interp.tokenize import pad_batch, pad_id

__all__ = ["ModelStudy", "model_study", "store_study", "toy_study"]

TOY_SAE_SETTINGS: dict[str, dict[str, Any]] = {
    "relu": {"l1": 0.3}, "topk": {}, "jumprelu": {"l0": 0.01},
}


def toy_study(*, n_features: int = 12, d_hidden: int = 4, sparsity: float = 0.95,
              architectures: Iterable[str] = ("relu", "topk", "jumprelu"), toy_steps: int = 1500,
              sae_steps: int = 1500, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ground truth: (summary per architecture, per-feature recovery per architecture).

    Summary columns: ``architecture``, ``d_sae`` (2 x n_features), ``mean_max_cos`` over the
    features the toy model represents, ``represented`` (how many), ``l0``,
    ``explained_variance``, ``dead_fraction``. The recovery table is
    :func:`~analyses.dictionary.metrics.feature_recovery`'s plus ``architecture`` and
    ``represented``."""
    toy = train_toy_model(n_features, d_hidden, sparsity=sparsity, steps=toy_steps, seed=seed)
    train = toy.hidden(20_000, seed=seed + 1)
    held_out = toy.hidden(5_000, seed=seed + 2)
    rep = toy.represented
    summary, recovery = [], []
    for arch in architectures:
        k = max(1, round(n_features * (1 - sparsity) * 2)) if arch == "topk" else None
        cfg = SAEConfig(d_in=d_hidden, d_sae=2 * n_features, architecture=arch, k=k,  # type: ignore[arg-type]
                        hook_name="toy.hidden")
        sae, _ = train_sae(train, cfg, steps=sae_steps, batch_size=256, seed=seed,
                           **TOY_SAE_SETTINGS.get(arch, {}))
        rec = feature_recovery(sae, toy.directions)
        rec.insert(0, "architecture", arch)
        rec["represented"] = rep.numpy()
        recovery.append(rec)
        stats = reconstruction_stats(sae, held_out)
        summary.append({"architecture": arch, "d_sae": cfg.d_sae,
                        "mean_max_cos": float(rec.loc[rec.represented, "max_cos"].mean()),
                        "represented": int(rep.sum()), "n_features": n_features,
                        "d_hidden": d_hidden, "l0": stats["l0"],
                        "explained_variance": stats["explained_variance"],
                        "dead_fraction": stats["dead_fraction"]})
    return pd.DataFrame(summary), pd.concat(recovery, ignore_index=True)


@dataclass
class ModelStudy:
    """What :func:`model_study` measured: the SAE, its stats (``reconstruction_stats`` plus
    CE loss recovered when the model has a next-token loss), training history, per-feature
    frequencies and top-activating examples."""

    sae: SAE
    stats: dict[str, float]
    history: pd.DataFrame
    frequencies: pd.DataFrame
    examples: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def repeated_random_batches(model: Any, *, n_seqs: int, seq_len: int, batch_size: int,
                            seed: int = 0) -> list[torch.Tensor]:
    """Sequences of random tokens repeated once (x1..xn x1..xn): the data of models trained
    on the induction task, whose vocabulary holds no English (``interp/data/induction.pt``)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(1, int(model.cfg.d_vocab), (n_seqs, max(1, seq_len // 2)), generator=gen)
    seqs = torch.cat([half, half], dim=1).to(model.device)
    return [seqs[i:i + batch_size] for i in range(0, n_seqs, batch_size)]


def model_study(
    model: Any, text: str | None, *, hook_name: str, hook_name_out: str | None = None,
    sae: SAE | None = None, architecture: str = "topk", expansion: int = 4, k: int = 32,
    l1: float = 1.0, steps: int = 1500, max_tokens: int = 8192, seq_len: int = 64,
    batch_size: int = 8, n_features: int = 8, n_examples: int = 5, seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> ModelStudy:
    """Train (or evaluate a given ``sae``) at ``hook_name`` on ``text``; see the module
    docstring. ``text=None`` uses :func:`repeated_random_batches`. The text is cut into
    ``seq_len``-token sequences; the first 80% train, the rest evaluate. Long because it is
    the study's one linear recipe: data, SAE, metrics."""
    names = [hook_name] + ([hook_name_out] if hook_name_out else [])
    model.check_hook_names(names)
    seq_len = min(seq_len, int(model.cfg.n_ctx))
    n_seqs = max(2, -(-max_tokens // max(1, seq_len - 1)))
    notes: list[str] = []
    if text is None:
        batches = repeated_random_batches(model, n_seqs=n_seqs, seq_len=seq_len,
                                          batch_size=batch_size, seed=seed)
        notes.append("Data: repeated random token sequences (the model's vocabulary does not "
                     "cover the English sample).")
    else:
        batches = text_to_batches(model, text, seq_len=seq_len, n_seqs=n_seqs,
                                  batch_size=batch_size)
    seqs = torch.cat(batches)
    cut = max(1, int(0.8 * len(seqs)))
    if cut >= len(seqs):
        cut = len(seqs) - 1 if len(seqs) > 1 else len(seqs)
    train_b = [seqs[i:i + batch_size] for i in range(0, cut, batch_size)]
    eval_b = [seqs[i:i + batch_size] for i in range(cut, len(seqs), batch_size)] or train_b
    recorded = collect_activations(model, names, train_b)
    eval_rec = collect_activations(model, names, eval_b)
    x, y = recorded[0], recorded[-1] if hook_name_out else None
    history = pd.DataFrame(columns=["step", "loss", "mse", "l0"])
    if sae is None:
        d = x.shape[1]
        cfg = SAEConfig(d_in=d, d_sae=expansion * d, architecture=architecture,  # type: ignore[arg-type]
                        k=min(k, expansion * d) if architecture == "topk" else None,
                        hook_name=hook_name, hook_name_out=hook_name_out,
                        model_name=str(getattr(model.cfg, "model_name", "") or ""))
        sae, history = train_sae(x, cfg, targets=y, steps=steps, l1=l1, seed=seed,
                                 progress=progress)
    else:
        sae._check_width(x)
    stats = reconstruction_stats(sae, eval_rec[0], eval_rec[-1] if hook_name_out else None)
    stats["train_tokens"] = float(x.shape[0])
    if model.cfg.architecture == "decoder" and model.cfg.has_unembed:
        stats.update(ce_loss_recovered(model, sae, eval_b))
    else:
        notes.append("CE loss recovered needs a next-token loss; this model is not a decoder "
                     "with an unembedding, so it is not stated.")
    freqs = feature_frequencies(sae, eval_rec[0])
    alive = freqs[freqs.frequency > 0].sort_values(["mean_act", "feature"], ascending=[False, True])
    shown = [int(f) for f in alive.feature.head(n_features)]
    examples = top_examples(model, sae, eval_b + train_b, features=shown, k=n_examples)
    return ModelStudy(sae, stats, history, freqs, examples, notes)


def store_study(
    model: Any, store: ActivationStore, *, hook_name: str, hook_name_out: str | None = None,
    sae: SAE | None = None, architecture: str = "topk", expansion: int = 4, k: int = 32,
    l1: float = 1.0, steps: int = 1500, batch_size: int = 8, ce_tokens: int = 4096,
    n_features: int = 8, n_examples: int = 5, seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> ModelStudy:
    """:func:`model_study` on a store (see the module docstring): training, the statistics,
    frequencies and top examples stream over its shards; the CE loss recovered runs ``model``
    (when it is a decoder with an unembedding; ``model=None`` skips it) over the first
    ``ce_tokens`` held-out tokens, rebuilt from the stored ids, ``batch_size`` sequences a
    forward. Long because it is the study's one linear recipe: data, SAE, metrics."""
    train = StoreSplit(store, hook_name, hook_name_out, split="train")
    held = StoreSplit(store, hook_name, hook_name_out, split="eval")
    held.require_rows()
    notes: list[str] = []
    history = pd.DataFrame(columns=["step", "loss", "mse", "l0"])
    d = train.width(hook_name)
    if sae is None:
        name = store.index.get("source", {}).get("model", "")
        cfg = SAEConfig(d_in=d, d_sae=expansion * d, architecture=architecture,  # type: ignore[arg-type]
                        k=min(k, expansion * d) if architecture == "topk" else None,
                        hook_name=hook_name, hook_name_out=hook_name_out, model_name=str(name))
        sae, history = train_sae(train, cfg, steps=steps, l1=l1, seed=seed, progress=progress)
    else:
        sae._check_width(torch.zeros(1, d))
    stats, freqs = streaming_stats(sae, held.batches(4096, shuffle=False))
    stats["train_tokens"] = float(train.n_rows)
    decoder = model is not None and model.cfg.architecture == "decoder" and model.cfg.has_unembed
    if decoder:
        seqs = held.pieces(ce_tokens)
        pad = pad_id(model)
        batches = [pad_batch(seqs[i:i + batch_size], pad_id=pad)
                   for i in range(0, len(seqs), batch_size)]
        stats.update(ce_loss_recovered(model, sae, [b.to(model.device) for b in batches]))
        stats["ce_tokens"] = float(sum(len(s) for s in seqs))
    else:
        notes.append("CE loss recovered needs a decoder with an unembedding; it is not stated.")
    # features with at least n_examples held-out hits, strongest first (the single strongest
    # activations are mostly one-off features with one example to show)
    seen = freqs[freqs.frequency * stats["tokens"] >= max(1, n_examples)]
    alive = seen.sort_values(["mean_act", "feature"], ascending=[False, True])
    shown = [int(f) for f in alive.feature.head(n_features)]
    examples = store_top_examples(held, sae, features=shown, k=n_examples, model=model)
    return ModelStudy(sae, stats, history, freqs, examples, notes)
