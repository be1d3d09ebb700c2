"""The FFN knowledge section's figures, drawn from the frames of :func:`analyses.ffn.analyse`.

Each function takes a frame and returns one matplotlib figure; nothing here computes a score.
The plotting module is imported inside each function, so importing the section (which topic
discovery does for every command) does not load matplotlib. (A private module: topic discovery
skips names starting with ``_``.)
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from analyses import ffn as fk

KIND_TITLES = {"resid": "residual stream", "mlp": "MLP output (window)",
               "attn": "attention output (window)", "mlp_single": "MLP output (one layer)",
               "attn_single": "attention output (one layer)"}


def _cmap(kind: str) -> str:
    """Residual stream purple, MLP green, attention red (as Meng et al.'s figures)."""
    if kind.startswith("resid"):
        return "Purples"
    return "Greens" if kind.startswith("mlp") else "Reds"


def trace_figure(avg: pd.DataFrame, corruption: str, title: str) -> Any:
    """One panel per restored kind: average indirect effect, position role x layer."""
    from analyses.app.plots import new_figure

    sub = avg[avg["corruption"] == corruption]
    kinds = [k for k in ("resid", "mlp", "attn", "mlp_single", "attn_single")
             if k in set(sub["kind"])]
    n_layers = int(sub["layer"].max()) + 1
    width = (min(20.0, 1.0 + 4.2 * len(kinds)) if n_layers <= 12
             else min(24.0, 1.0 + 5.0 * len(kinds)))
    fig = new_figure(width, 3.6)
    vmax = max(float(sub["aie"].max()), 1e-6)
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        m = sub[sub["kind"] == kind].pivot_table(index="role", columns="layer", values="aie",
                                                 observed=True)
        m = m.reindex([r for r in fk.POSITION_ROLES if r in m.index])
        im = ax.imshow(m.to_numpy(dtype=float), aspect="auto", cmap=_cmap(kind), vmin=0,
                       vmax=vmax)
        names = [r.replace("_", " ") for r in m.index] if i == 0 else [""] * len(m.index)
        ax.set_yticks(range(len(m.index)), names, fontsize=7)
        step = max(1, len(m.columns) // 10)
        ax.set_xticks(range(0, len(m.columns), step), [str(c) for c in m.columns[::step]],
                      fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def example_figure(trace: pd.DataFrame, fact: str, corruption: str) -> Any:
    """Meng et al. Fig. 1 for one fact: token x layer indirect effect per kind."""
    from analyses.app.plots import clean_token, new_figure

    sub = trace[(trace["fact"] == fact) & (trace["corruption"] == corruption)]
    kinds = [k for k in ("resid", "mlp", "attn") if k in set(sub["kind"])]
    fig = new_figure(min(20.0, 1.0 + 4.4 * len(kinds)), 3.4)
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        k = sub[sub["kind"] == kind]
        m = k.pivot_table(index="position", columns="layer", values="indirect_effect")
        labels = k.drop_duplicates("position").set_index("position")["token"].reindex(m.index)
        im = ax.imshow(m.to_numpy(dtype=float), aspect="auto", cmap=_cmap(kind))
        names = [clean_token(str(t)) for t in labels] if i == 0 else [""] * len(m.index)
        ax.set_yticks(range(len(m.index)), names, fontsize=7)
        step = max(1, len(m.columns) // 10)
        ax.set_xticks(range(0, len(m.columns), step), [str(c) for c in m.columns[::step]],
                      fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"causal trace of one fact ({corruption}): {fact}".replace("$", r"\$"),
                 fontsize=10)
    return fig


def logit_lens_figure(ll: pd.DataFrame) -> Any:
    """Answer probability, answer rank and KL to the final layer, per layer."""
    from analyses.app.plots import new_figure

    mean = ll.groupby("layer")[["answer_prob", "kl_to_final"]].mean()
    rank = ll.groupby("layer")["answer_rank"].median()
    fig = new_figure(11.0, 3.4)
    panels = [("answer_prob", "P(answer), mean"), ("rank", "answer rank, median (log)"),
              ("kl_to_final", "KL(final || layer), mean")]
    for i, (col, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        y = rank if col == "rank" else mean[col]
        ax.plot(y.index, y.to_numpy(), marker="o", markersize=3)
        if col == "rank":
            ax.set_yscale("log")
        ax.set_xlabel("layer (-1 = embeddings)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("logit lens at the prediction position", fontsize=10)
    return fig


def edits_figure(summary: pd.DataFrame) -> Any:
    """Mean relative change of P(answer) per edit mode and target, against Dai et al.'s."""
    from analyses.app.plots import new_figure

    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    labels, values = [], []
    for r in summary.itertuples():
        labels.append(f"{r.mode}\n{r.target}")
        values.append(100 * r.mean_rel_change)
    colors = ["#c0392b" if "suppress" in lab else "#27ae60" for lab in labels]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.axhline(100 * fk.DAI_SUPPRESS, color="#c0392b", ls="--", lw=1, label="Dai et al.: -29%")
    ax.axhline(100 * fk.DAI_AMPLIFY, color="#27ae60", ls="--", lw=1, label="Dai et al.: +31%")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("mean relative change of P(answer), %")
    ax.set_title("editing knowledge neurons", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return fig


def agreement_figure(agreement: pd.DataFrame) -> Any:
    """Key-value agreement per layer against its neuron-shuffled baselines."""
    from analyses.app.plots import new_figure

    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    for col, style, label in [
            ("agreement_top1", "-o", "value top token = next token of top trigger"),
            ("baseline_top1", "--", "shuffled baseline"),
            ("agreement_any", "-s", "= next token of any top-k trigger"),
            ("baseline_any", ":", "shuffled baseline (any)")]:
        ax.plot(agreement["layer"], 100 * agreement[col], style, markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("% of neurons")
    ax.set_title("key-value agreement (Geva et al. 2021)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return fig
