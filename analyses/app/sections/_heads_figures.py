"""The head-taxonomy section's figures, drawn from the frames of :mod:`analyses.heads`.

Each function takes a frame (or the analysis result) and returns one matplotlib figure;
nothing here computes a score. :func:`compare_figure` is public: tests and notebooks draw
the side-by-side label maps of ``interp heads --compare`` with it.

(A private module: topic discovery skips names starting with ``_``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analyses import heads as H

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["compare_figure", "focus", "heat", "layer_lines", "syntax_bars"]


def _escape(text: str) -> str:
    """Keep matplotlib's mathtext away from user text (model names with $)."""
    return text.replace("$", r"\$")


def compare_figure(df: pd.DataFrame, *, title: str = "Head labels side by side") -> Figure:
    """One layer x head label map per model (column ``model``), with shared colours."""
    import seaborn as sns

    from analyses.app import plots

    models = list(dict.fromkeys(df["model"]))
    labels = sorted(df["label"].astype(str).unique())
    code = {lab: i for i, lab in enumerate(labels)}
    palette = sns.color_palette("tab10" if len(labels) <= 10 else "tab20", len(labels))
    cmap = ListedColormap(palette).with_extremes(bad="#eeeeee")
    norm = BoundaryNorm(np.arange(len(labels) + 1) - 0.5, len(labels))
    n_l, n_h = int(df["layer"].max()) + 1, int(df["head"].max()) + 1
    fig = plots.new_figure(min(18.0, 1.0 + len(models) * (0.6 * n_h + 1.0)) + 2.5, 1.8 + 0.6 * n_l)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, name in zip(axes, models, strict=True):
        sub = df[df["model"] == name]
        grid = np.full((n_l, n_h), np.nan)
        for r in sub.itertuples():
            grid[int(r.layer), int(r.head)] = code[str(r.label)]
            ax.text(int(r.head), int(r.layer), f"{r.confidence:.2f}", ha="center", va="center",
                    fontsize=7)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                  interpolation="nearest")
        ax.set_xticks(np.arange(n_h), [str(i) for i in range(n_h)])
        ax.set_yticks(np.arange(n_l), [str(i) for i in range(n_l)])
        ax.set_xlabel("head")
        ax.set_title(_escape(str(name)), fontsize=9)
    axes[0].set_ylabel("layer")
    counts = df["label"].astype(str).value_counts()
    handles = [Patch(facecolor=palette[i], label=_escape(f"{lab} ({counts[lab]})"))
               for i, lab in enumerate(labels)]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8)
    fig.suptitle(_escape(f"{title} (cell text: confidence)"), fontsize=10)
    return fig


def syntax_bars(best: pd.DataFrame) -> Figure:
    """Best head per relation against the best fixed-offset baseline, as paired bars."""
    from analyses.app import plots

    b = best.dropna(subset=["accuracy"])
    long = pd.concat([
        pd.DataFrame({"relation": b["relation"], "accuracy": b["accuracy"],
                      "series": "best head"}),
        pd.DataFrame({"relation": b["relation"], "accuracy": b["baseline_accuracy"],
                      "series": "best fixed offset"}),
    ], ignore_index=True)
    return plots.bars(long, "relation", "accuracy", hue="series",
                      title="Best head per relation against the best fixed-offset baseline "
                            "(Clark et al. 2019)",
                      ylabel="accuracy (share of pairs)")


_TARGET_NAMES = {"sink_first": "first token", "bos": "BOS", "cls": "[CLS]", "sep": "[SEP]",
                 "punct": "punctuation", "rand_first": "first token (random tokens)"}


def layer_lines(layers: pd.DataFrame) -> Figure:
    """Attention share to the first token, specials and punctuation, one line each per layer."""
    from analyses.app import plots

    cols = [c for c in ("sink_first", "bos", "cls", "sep", "punct")
            if c in layers and (layers[c] > 0).any()]
    if any(np.allclose(layers["sink_first"], layers[c]) for c in ("bos", "cls") if c in cols):
        cols.remove("sink_first")  # the first token is always BOS / [CLS]: one line, not two
    cols.append("rand_first")
    long = layers.melt(id_vars="layer", value_vars=cols, var_name="target", value_name="share")
    long["target"] = long["target"].map(_TARGET_NAMES)
    return plots.lines(long, "layer", "share", hue="target",
                       title="Attention share to sinks and delimiters per layer",
                       ylabel="mean attention share")


def heat(h: pd.DataFrame, col: str, title: str) -> Figure:
    """One score of the heads frame as a layer x head heatmap."""
    from analyses.app import plots

    m = h.pivot(index="layer", columns="head", values=col).sort_index()
    return plots.heatmap(m, title=title, cmap="magma")


def focus(model: HookedTransformer, res: H.HeadAnalysis, layer: int,
          head: int) -> tuple[pd.DataFrame, Figure]:
    """One head's scores (long form) and its pattern on a repeated random sequence."""
    from analyses.app import plots

    row = res.heads[(res.heads["layer"] == layer) & (res.heads["head"] == head)].iloc[0]
    table = pd.DataFrame({"score": row.index, "value": [str(v) for v in row.values]})
    batch = next(H.random_batches(model, n_seqs=1, half_len=12, batch_size=1))
    import torch

    hook = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens.to(model.W_E.device), names_filter=[hook])
    pat = cache[hook][0, head].float().cpu().numpy()
    tok = getattr(model, "tokenizer", None)
    ids = batch.tokens[0].tolist()
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        names = [str(x) for x in tok.convert_ids_to_tokens(ids)]
    else:
        names = [str(i) for i in ids]
    title = f"L{layer}H{head} ({row['label']}) on repeated random tokens"
    return table, plots.head_pattern(pat, names, title=title)
