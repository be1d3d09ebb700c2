"""How good an SAE is: sparsity, reconstruction, downstream loss, feature recovery, examples.

- L0: mean number of active features per token.
- Explained variance: ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the data.
- Dead / dense features: never active on the evaluation tokens / active on more than 10% of
  them (dense features are usually uninterpretable; Bricken et al. 2023 flag >1% as "ultra
  high frequency", we state both fractions).
- CE loss recovered (Bricken et al. 2023; SAELens' ``ce_loss_score``): splice the SAE in
  without its error term and compare the next-token loss with the clean model and with the
  activation zero-ablated: ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``, 1 is perfect.
- Feature recovery (ground truth only): for every true direction, the best cosine similarity
  to any decoder row; the mean over true features is the "mean max cosine similarity"
  (Sharkey et al. 2022, "Taking features out of superposition").
- Top-activating examples per feature: the contexts where each feature fires most.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping

import pandas as pd
import torch

from analyses.dictionary.sae import SAE
from analyses.dictionary.splice import splice
from interp.errors import InterpError
from interp.tokenize import TokenBatch

__all__ = ["ce_loss_recovered", "feature_frequencies", "feature_recovery",
           "reconstruction_stats", "streaming_stats", "top_examples"]

DENSE = 0.1


@torch.no_grad()
def reconstruction_stats(sae: SAE, acts: torch.Tensor,
                         targets: torch.Tensor | None = None) -> dict[str, float]:
    """L0, explained variance, relative MSE, dead and dense fractions on ``acts`` [n, d_in]."""
    y = acts if targets is None else targets
    f = sae.encode(acts)
    err = (sae.decode(f) - y).pow(2).sum()
    total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    freq = (f > 0).float().mean(0)
    return {
        "l0": float((f > 0).float().sum(-1).mean()),
        "explained_variance": float(1 - err / total),
        "relative_mse": float(err / y.pow(2).sum().clamp_min(1e-12)),
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > DENSE).float().mean()),
        "tokens": float(acts.shape[0]),
    }


@torch.no_grad()
def streaming_stats(sae: SAE, batches: Iterable[Mapping[str, torch.Tensor]]
                    ) -> tuple[dict[str, float], pd.DataFrame]:
    """:func:`reconstruction_stats` and :func:`feature_frequencies` over batches ``{"x": [b,
    d_in], "y": [b, d_out]}`` (``y`` the transcoder's targets, else ``x``), from float64
    running sums: memory is one batch, whatever the number of rows. The total variance is
    ``sum ||y||^2 - n ||mean y||^2``."""
    n, err, sq, l0 = 0, 0.0, 0.0, 0.0
    total = torch.zeros(0, dtype=torch.float64)
    n_on = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    act_sum = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for b in batches:
        x, y = b["x"], b.get("y", b["x"])
        f = sae.encode(x)
        err += float((sae.decode(f) - y).double().pow(2).sum())
        sq += float(y.double().pow(2).sum())
        total = y.double().sum(0) if n == 0 else total + y.double().sum(0)
        on = f > 0
        l0 += float(on.sum())
        n_on += on.sum(0).double()
        act_sum += f.double().sum(0)
        n += x.shape[0]
    if n == 0:
        raise InterpError("No rows to measure the SAE on; pass a non-empty evaluation set.")
    var = max(sq - float(total.pow(2).sum()) / n, 1e-12)
    freq = n_on / n
    stats = {"l0": l0 / n, "explained_variance": 1 - err / var,
             "relative_mse": err / max(sq, 1e-12),
             "dead_fraction": float((freq == 0).double().mean()),
             "dense_fraction": float((freq > DENSE).double().mean()), "tokens": float(n)}
    freqs = pd.DataFrame({"feature": range(sae.cfg.d_sae), "frequency": freq.float().numpy(),
                          "mean_act": (act_sum / n_on.clamp_min(1)).float().numpy()})
    return stats, freqs


@torch.no_grad()
def feature_frequencies(sae: SAE, acts: torch.Tensor) -> pd.DataFrame:
    """Per feature: ``feature``, ``frequency`` (share of tokens it fires on), ``mean_act``
    (its mean activation where it fires)."""
    f = sae.encode(acts)
    on = (f > 0).float()
    n_on = on.sum(0)
    return pd.DataFrame({"feature": range(f.shape[1]), "frequency": (n_on / f.shape[0]).numpy(),
                         "mean_act": (f.sum(0) / n_on.clamp_min(1)).numpy()})


@torch.no_grad()
def feature_recovery(sae: SAE, true_dirs: torch.Tensor) -> pd.DataFrame:
    """Per true feature (rows of ``true_dirs`` [n_true, d_in]): ``true_feature``,
    ``best_sae_feature`` and ``max_cos`` (cosine similarity of the closest decoder row)."""
    dec = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    true = true_dirs / true_dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = true.float() @ dec.float().T
    best, idx = cos.max(dim=1)
    return pd.DataFrame({"true_feature": range(true.shape[0]), "best_sae_feature": idx.numpy(),
                         "max_cos": best.numpy()})


@torch.no_grad()
def ce_loss_recovered(model: object, sae: SAE, batches: Iterable[torch.Tensor | TokenBatch], *,
                      skip_first: bool = True) -> dict[str, float]:
    """Next-token loss clean, with the SAE spliced in (no error term), and with the SAE's
    output hook zero-ablated; ``ce_recovered`` as in the module docstring. Decoders only.
    ``skip_first`` leaves the first position alone in both (the SAE is trained without it;
    see :func:`~analyses.dictionary.splice.splice`)."""
    m = model
    out_name = sae.cfg.hook_name_out or sae.cfg.hook_name
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablated": 0.0}
    n = 0

    def zero(x: torch.Tensor, hook: object) -> torch.Tensor:
        out = torch.zeros_like(x)
        if skip_first and x.shape[1] > 1:
            out[:, 0] = x[:, 0]
        return out

    # a TokenBatch (right-padded pieces of different lengths) brings its mask: padding is
    # neither read nor scored
    runs = [(b.tokens, {"attention_mask": b.attention_mask.long()}) if isinstance(b, TokenBatch)
            else (b, {}) for b in batches]
    for tokens, kw in runs:
        sums["ce_clean"] += float(m(tokens, return_type="loss", **kw))  # type: ignore[operator]
        sums["ce_zero_ablated"] += float(m.run_with_hooks(  # type: ignore[attr-defined]
            tokens, return_type="loss", fwd_hooks=[(out_name, zero)], **kw))
        n += 1
    with splice(m, sae, keep_error=False, skip_first=skip_first):
        for tokens, kw in runs:
            sums["ce_spliced"] += float(m(tokens, return_type="loss", **kw))  # type: ignore[operator]
    res = {k: v / max(n, 1) for k, v in sums.items()}
    gap = res["ce_zero_ablated"] - res["ce_clean"]
    recovered = (res["ce_zero_ablated"] - res["ce_spliced"]) / gap if gap else float("nan")
    res["ce_recovered"] = recovered
    return res


def _token_text(model: object, token: int) -> str:
    """A token as text, or ``<id>`` for a model without a tokenizer (a trained toy)."""
    if getattr(model, "tokenizer", None) is None:
        return f"<{token}>"
    return str(model.to_string([token]))  # type: ignore[attr-defined]


@torch.no_grad()
def top_examples(model: object, sae: SAE, batches: Iterable[torch.Tensor], *,
                 features: list[int], k: int = 5, window: int = 8) -> pd.DataFrame:
    """The ``k`` strongest activations of each of ``features`` over the corpus, streamed with
    one bounded heap per feature. Columns: ``feature``, ``rank``, ``activation``, ``token``
    (the token where it fires) and ``context`` (up to ``window`` tokens before it, then the
    token in [brackets])."""
    name = f"{sae.cfg.hook_name_out or sae.cfg.hook_name}.hook_sae_acts"
    heaps: dict[int, list[tuple[float, int, list[int], int]]] = {f: [] for f in features}
    counter = 0
    with splice(model, sae):
        for tokens in batches:
            _, cache = model.run_with_cache(tokens, names_filter=[name])  # type: ignore[attr-defined]
            acts = cache[name][..., features].float().cpu()  # [batch, pos, n_feat]
            for j, feat in enumerate(features):
                vals, flat = acts[..., j].flatten().topk(min(k, acts[..., j].numel()))
                for v, i in zip(vals.tolist(), flat.tolist(), strict=True):
                    if v <= 0:
                        break
                    b, p = divmod(i, acts.shape[1])
                    ctx = tokens[b, max(0, p - window):p + 1].tolist()
                    counter += 1
                    item = (v, counter, ctx, p)
                    if len(heaps[feat]) < k:
                        heapq.heappush(heaps[feat], item)
                    else:
                        heapq.heappushpop(heaps[feat], item)
    rows = []
    for feat in features:
        for rank, (v, _, ctx, _) in enumerate(sorted(heaps[feat], reverse=True)):
            strs = [_token_text(model, t) for t in ctx]
            rows.append({"feature": feat, "rank": rank, "activation": v, "token": strs[-1],
                         "context": "".join(strs[:-1]) + f"[{strs[-1]}]"})
    return pd.DataFrame(rows, columns=["feature", "rank", "activation", "token", "context"])
