"""Figures from DataFrames and arrays: attention heatmaps, head grids, label maps.

Why this module never sees a model: plots must be reproducible from the CSVs a report
writes (``data/*.csv``), so every function here takes plain arrays or tidy DataFrames.
Analyses compute, this module draws, :mod:`analyses.app.report` writes files.

Figures are built as bare :class:`matplotlib.figure.Figure` objects rendered by the Agg
canvas, never through ``pyplot``'s global figure manager: a report run that draws
hundreds of figures keeps no hidden references (no "More than 20 figures" leak), and a
notebook user's interactive backend is left alone. :func:`save_figure` writes PNG (and
SVG on request) and closes the figure.

Token labels are cleaned by :func:`clean_token` so BPE markers (``Ġ``, ``▁``, ``Ċ``) read
as visible spaces and newlines, and ``$`` never triggers matplotlib's mathtext.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "MAX_PNG_PIXELS",
    "bars",
    "clean_token",
    "head_grid",
    "head_pattern",
    "heatmap",
    "label_map",
    "layer_head_grid",
    "lines",
    "new_figure",
    "save_figure",
]

# PNGs are for reading on a screen, embedded in a self-contained HTML page: 100 dpi and
# at most this many pixels on the long side keeps a 30-figure report at a few MB.
PNG_DPI = 100
MAX_PNG_PIXELS = 2000
# Ids in SVG files are hashed from this salt instead of a random one, so the same figure
# gives the same bytes (report determinism).
matplotlib.rcParams["svg.hashsalt"] = "interp"

# Visible stand-ins for whitespace and tokenizer markers. GPT-2 style byte-level BPE
# writes a leading space as "Ġ" and a newline as "Ċ"; SentencePiece writes "▁".
_MARKERS = {"Ġ": "␣", "▁": "␣", "Ċ": "↵", "ĉ": "→", " ": "␣", "\n": "↵", "\t": "→", "\r": "↵"}
_MAX_LABEL_CHARS = 14


def clean_token(token: str, *, max_chars: int = _MAX_LABEL_CHARS) -> str:
    """Make one token string safe and readable as a tick label.

    Why: raw tokens like ``"Ġthe"`` or ``" $5"`` render as mojibake or as mathtext
    (``$`` starts a formula in matplotlib and an odd number of them raises at draw time).
    Whitespace and BPE markers become visible glyphs, ``$`` is escaped, very long tokens
    are cut with an ellipsis, and an empty token shows as ``∅``.

    >>> clean_token("Ġthe"), clean_token("$5"), clean_token("##ing"), clean_token("")
    ('␣the', '\\\\$5', '##ing', '∅')
    """
    if token == "":
        return "∅"
    text = "".join(_MARKERS.get(ch, ch) for ch in str(token))
    # Remaining control characters would draw as boxes; show their code point instead.
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("$", r"\$")


def _escape(text: str) -> str:
    """Escape mathtext in titles and axis labels that may carry user text."""
    return str(text).replace("$", r"\$")


def _label(value: object, max_chars: int = 24) -> str:
    """A category label (not a token): keep spaces, escape ``$``, cut long names."""
    text = str(value)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return _escape(text)


def _wrap(fig: Figure, text: str) -> str:
    """A title wrapped to the figure's width, mathtext-escaped.

    Why: constrained layout cannot shrink a title, so one wider than a small figure is
    cut off at both edges in the PNG. About 9 characters of 12 pt text per figure inch
    stay inside the axes (which the title is centred on).
    """
    width_chars = max(20, int(fig.get_size_inches()[0] * 9))
    lines = textwrap.wrap(str(text), width=width_chars, break_long_words=False) or [""]
    return _escape("\n".join(lines))


def new_figure(width: float, height: float) -> Figure:
    """A figure outside pyplot's registry, drawn by Agg (see module docstring for why)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _token_fontsize(n: int) -> float:
    """Tick font that stays legible: 10 pt for short texts down to 6 pt at ~60 tokens."""
    return float(np.clip(10 - (n - 15) * 0.1, 6, 10))


def _check_tokens(name: str, tokens: Sequence[str] | None, size: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(size)]
    tokens = list(tokens)
    if len(tokens) != size:
        raise ValueError(f"{name} has {len(tokens)} tokens but the pattern has {size} positions")
    return tokens


def head_pattern(
    pattern: np.ndarray,
    tokens: Sequence[str],
    *,
    title: str,
    query_tokens: Sequence[str] | None = None,
) -> Figure:
    """One head's attention pattern [q, k] as a heatmap with tokens on both axes.

    Rows are queries (the token that attends), columns are keys (the token attended to),
    the usual TransformerLens / CircuitsVis orientation. The figure grows with the token
    count (about 0.28 inch per token) so labels stay readable up to ~40-60 tokens; key
    labels are rotated 90 degrees. The colour scale runs from 0 to the pattern's maximum
    so a head whose weights stay below 0.3 is still visible; the colour bar says so.
    """
    pattern = np.asarray(pattern, dtype=float)
    if pattern.ndim != 2:
        raise ValueError(f"head_pattern expects a [q, k] matrix, got shape {pattern.shape}")
    n_q, n_k = pattern.shape
    keys = [clean_token(t) for t in _check_tokens("tokens", tokens, n_k)]
    queries = (
        keys
        if query_tokens is None and n_q == n_k
        else [clean_token(t) for t in _check_tokens("query_tokens", query_tokens, n_q)]
    )
    cell = 0.28
    fig = new_figure(max(4.5, 1.6 + cell * n_k), max(3.5, 1.4 + cell * n_q))
    ax = fig.add_subplot()
    vmax = float(np.nanmax(pattern)) if pattern.size and np.isfinite(pattern).any() else 1.0
    sns.heatmap(
        pattern,
        ax=ax,
        cmap="rocket_r",
        vmin=0.0,
        vmax=max(vmax, 1e-6),
        square=n_q <= 60 and n_k <= 60,
        xticklabels=keys,
        yticklabels=queries,
        cbar_kws={"label": "attention weight", "shrink": 0.8},
    )
    fs = _token_fontsize(max(n_q, n_k))
    ax.set_xticks(np.arange(n_k) + 0.5, keys, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(n_q) + 0.5, queries, rotation=0, fontsize=fs)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(_wrap(fig, title))
    return fig


def _grid_shape(n: int) -> tuple[int, int]:
    cols = min(n, 4 if n <= 8 else 6 if n <= 24 else 8)
    return math.ceil(n / cols), cols


def head_grid(
    patterns: np.ndarray,
    tokens: Sequence[str],
    *,
    layer: int,
    title: str,
) -> Figure:
    """All heads of one layer as small heatmaps [n_heads, q, k], one panel per head.

    Panels share one 0..1 colour scale so heads compare at a glance (a sink head is dark
    in one column, a previous-token head on the sub-diagonal). Token labels are drawn on
    the outer panels only and only for texts of at most 24 tokens; longer texts would
    make them unreadable at panel size, use :func:`head_pattern` for those.
    """
    patterns = np.asarray(patterns, dtype=float)
    if patterns.ndim != 3:
        raise ValueError(f"head_grid expects [n_heads, q, k], got shape {patterns.shape}")
    n_heads, n_q, n_k = patterns.shape
    labels = [clean_token(t, max_chars=8) for t in _check_tokens("tokens", tokens, n_k)]
    rows, cols = _grid_shape(n_heads)
    show_labels = n_k <= 24 and n_q == n_k
    panel = 2.6 if show_labels else 2.0
    fig = new_figure(cols * panel + 1.0, rows * panel + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    fs = 6 if n_k > 12 else 7
    mappable = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= n_heads:
            ax.set_axis_off()
            continue
        mappable = ax.imshow(
            patterns[h], cmap="rocket_r", vmin=0.0, vmax=1.0, aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(f"L{layer}H{h}", fontsize=9)
        ax.tick_params(length=0)
        # Labels on the outer panels only: the lowest panel of each column, the first column.
        if show_labels and h + cols >= n_heads:
            ax.set_xticks(np.arange(n_k), labels, rotation=90, fontsize=fs)
        else:
            ax.set_xticks([])
        if show_labels and h % cols == 0:
            ax.set_yticks(np.arange(n_q), labels, fontsize=fs)
        else:
            ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.6, pad=0.01, label="attention weight")
    fig.suptitle(_wrap(fig, title))
    return fig


def layer_head_grid(
    patterns: np.ndarray,
    tokens: Sequence[str],
    *,
    title: str = "attention patterns, every layer and head",
) -> Figure:
    """Every head of every layer [n_layers, n_heads, q, k] as a thumbnail grid.

    Rows are layers, columns heads. The panels are too small for token labels: this is
    the overview that tells you which (layer, head) to plot on its own. Panel size
    shrinks with the grid so even 30 x 9 (SmolLM2-135M) stays under ~2000 pixels.
    """
    patterns = np.asarray(patterns, dtype=float)
    if patterns.ndim != 4:
        raise ValueError(
            f"layer_head_grid expects [n_layers, n_heads, q, k], got shape {patterns.shape}"
        )
    n_layers, n_heads, _, n_k = patterns.shape
    _check_tokens("tokens", tokens, n_k)
    panel = float(np.clip(18.0 / max(n_layers, n_heads), 0.5, 1.3))
    fig = new_figure(n_heads * panel + 1.6, n_layers * panel + 0.9)
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    mappable = None
    for layer in range(n_layers):
        for h in range(n_heads):
            ax = axes[layer][h]
            mappable = ax.imshow(
                patterns[layer, h], cmap="rocket_r", vmin=0.0, vmax=1.0, aspect="auto",
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"H{h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"L{layer}", fontsize=8, rotation=0, ha="right", va="center")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.5, pad=0.01, label="attention weight")
    fig.suptitle(_wrap(fig, title))
    return fig


def label_map(
    df: pd.DataFrame,
    *,
    label_col: str = "label",
    value_col: str = "confidence",
    layer_col: str = "layer",
    head_col: str = "head",
    title: str = "head labels",
) -> Figure:
    """Layer x head map coloured by a categorical label, each cell annotated with a value.

    ``df`` has one row per head with columns ``layer``, ``head``, ``label_col`` and
    ``value_col`` (e.g. the head taxonomy table). Colours are assigned to labels in sorted
    order, so the same label set always gets the same colours; heads absent from ``df``
    are light grey. The legend names every label and how many heads carry it.
    """
    missing = [c for c in (layer_col, head_col, label_col, value_col) if c not in df.columns]
    if missing:
        raise ValueError(f"label_map: missing column(s) {missing}; have {list(df.columns)}")
    if df.empty:
        raise ValueError("label_map: the frame is empty")
    labels = sorted(df[label_col].astype(str).unique())
    code = {lab: i for i, lab in enumerate(labels)}
    n_layers = int(df[layer_col].max()) + 1
    n_heads = int(df[head_col].max()) + 1
    codes = np.full((n_layers, n_heads), np.nan)
    values = np.full((n_layers, n_heads), np.nan)
    cols = [layer_col, head_col, label_col, value_col]
    for layer, head, label, value in df[cols].itertuples(index=False, name=None):
        codes[int(layer), int(head)] = code[str(label)]
        values[int(layer), int(head)] = float(value)
    palette = sns.color_palette("tab10" if len(labels) <= 10 else "tab20", len(labels))
    cmap = ListedColormap(palette).with_extremes(bad="#eeeeee")
    norm = BoundaryNorm(np.arange(len(labels) + 1) - 0.5, len(labels))
    cell = float(np.clip(14.0 / max(n_heads, n_layers), 0.35, 0.75))
    fig = new_figure(n_heads * cell + 4.0, n_layers * cell + 1.2)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(codes), cmap=cmap, norm=norm, aspect="auto",
              interpolation="nearest")
    fs = float(np.clip(cell * 14, 5, 9))
    for layer in range(n_layers):
        for head in range(n_heads):
            if np.isfinite(values[layer, head]):
                rgb = palette[int(codes[layer, head])]
                dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                ax.text(head, layer, f"{values[layer, head]:.2f}", ha="center", va="center",
                        fontsize=fs, color="white" if dark else "black")
    ax.set_xticks(np.arange(n_heads), [str(h) for h in range(n_heads)])
    ax.set_yticks(np.arange(n_layers), [str(layer) for layer in range(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(_wrap(fig, f"{title} (cell text: {value_col})"))
    counts = df[label_col].astype(str).value_counts()
    handles = [
        Patch(facecolor=palette[i], label=_escape(f"{lab} ({counts[lab]})"))
        for i, lab in enumerate(labels)
    ]
    ax.legend(handles=handles, title=_escape(label_col), loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return fig


def heatmap(
    matrix_df: pd.DataFrame,
    *,
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    annotate: bool | None = None,
    center: float | None = None,
    fmt: str = ".2f",
) -> Figure:
    """A labelled heatmap of a matrix-shaped DataFrame (index = rows, columns = columns).

    ``annotate=None`` writes the values into the cells when the matrix is small enough
    to read them (at most 20 x 20). ``center`` switches to a diverging scale around that
    value (use ``center=0`` with ``cmap="RdBu_r"`` for signed effects such as loss deltas).
    """
    if matrix_df.empty:
        raise ValueError(f"heatmap {title!r}: the frame is empty")
    n_rows, n_cols = matrix_df.shape
    if annotate is None:
        annotate = n_rows <= 20 and n_cols <= 20
    cell = 0.45 if annotate else 0.3
    fig = new_figure(min(18.0, max(4.5, 2.5 + cell * n_cols)),
                     min(18.0, max(3.5, 1.5 + cell * n_rows)))
    ax = fig.add_subplot()
    values = matrix_df.to_numpy(dtype=float)
    xt = [_label(c) for c in matrix_df.columns]
    yt = [_label(i) for i in matrix_df.index]
    sns.heatmap(values, ax=ax, cmap=cmap, center=center, annot=annotate, fmt=fmt,
                annot_kws={"fontsize": 7}, xticklabels=xt, yticklabels=yt,
                cbar_kws={"shrink": 0.8})
    ax.set_xticks(np.arange(n_cols) + 0.5, xt, rotation=90 if n_cols > 6 else 0, fontsize=8)
    ax.set_yticks(np.arange(n_rows) + 0.5, yt, rotation=0, fontsize=8)
    ax.set_xlabel(_escape(xlabel or str(matrix_df.columns.name or "")))
    ax.set_ylabel(_escape(ylabel or str(matrix_df.index.name or "")))
    ax.set_title(_wrap(fig, title))
    return fig


def _xy_figure(df: pd.DataFrame, x: str, y: str, hue: str | None, kind: str) -> Figure:
    for col in (x, y, hue):
        if col is not None and col not in df.columns:
            raise ValueError(f"{kind}: no column {col!r}; have {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{kind}: the frame is empty")
    n_x = df[x].nunique()
    width = min(16.0, max(5.0, 1.5 + 0.35 * n_x)) if kind == "bars" else 6.5
    return new_figure(width, 4.0)


def bars(
    df: pd.DataFrame, x: str, y: str, hue: str | None = None, *, title: str = "",
    xlabel: str | None = None, ylabel: str | None = None,
) -> Figure:
    """Bar chart of ``y`` per ``x`` (mean with a 95% interval when ``x`` repeats).

    Category labels rotate when there are more than 6 so they never overlap.
    """
    fig = _xy_figure(df, x, y, hue, "bars")
    ax = fig.add_subplot()
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, errorbar=("ci", 95), seed=0)
    if df[x].nunique() > 6 and df[x].astype(str).str.len().max() > 2:
        ax.tick_params(axis="x", labelrotation=90)
    _finish_xy(ax, title, xlabel or x, ylabel or y, hue)
    return fig


def lines(
    df: pd.DataFrame, x: str, y: str, hue: str | None = None, *, title: str = "",
    xlabel: str | None = None, ylabel: str | None = None, marker: str = "o",
) -> Figure:
    """Line plot of ``y`` against ``x``, one line per ``hue`` (e.g. a metric per layer)."""
    fig = _xy_figure(df, x, y, hue, "lines")
    ax = fig.add_subplot()
    sns.lineplot(data=df, x=x, y=y, hue=hue, ax=ax, marker=marker, errorbar=("ci", 95),
                 seed=0)
    _finish_xy(ax, title, xlabel or x, ylabel or y, hue)
    return fig


def _finish_xy(ax, title: str, xlabel: str, ylabel: str, hue: str | None) -> None:
    ax.set_title(_wrap(ax.figure, title))
    ax.set_xlabel(_escape(xlabel))
    ax.set_ylabel(_escape(ylabel))
    ax.grid(alpha=0.3)
    if hue is not None and ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                        title=_escape(hue))


def save_figure(fig: Figure, path_stem: str | Path, svg: bool = False) -> list[Path]:
    """Write ``<path_stem>.png`` (and ``.svg`` when ``svg``) and close the figure.

    The PNG is 100 dpi, lowered further when the long side would exceed
    ``MAX_PNG_PIXELS``, so that a figure embedded in HTML stays small but readable.
    Metadata that changes between runs (software version, SVG date) is dropped, so the
    same figure gives the same bytes. Returns the written paths.
    """
    import matplotlib.pyplot as plt  # only to release figures someone made with pyplot

    stem = Path(path_stem)
    width, height = fig.get_size_inches()
    dpi = min(PNG_DPI, MAX_PNG_PIXELS / max(width, height, 1e-9))
    written = [stem.with_suffix(".png")]
    try:
        fig.savefig(written[0], dpi=dpi, format="png", metadata={"Software": None},
                    facecolor="white")
        if svg:
            written.append(stem.with_suffix(".svg"))
            fig.savefig(written[1], format="svg", metadata={"Date": None, "Creator": None},
                        facecolor="white")
    finally:
        plt.close(fig)
    return written
