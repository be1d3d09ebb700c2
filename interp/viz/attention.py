"""Attention patterns as an interactive, self-contained HTML explorer (no network, no server).

Why our own and not bertviz or circuitsvis: both are good views, but circuitsvis loads its
code from a CDN by default and neither reads interp's caches; a report must open from disk on
an air-gapped machine. :class:`AttentionView` holds the patterns of one or more texts
(8-bit, see :func:`quantise`) with the head taxonomy's label per head, and renders one HTML
page whose JavaScript, CSS and data are all inline (:mod:`interp.viz.page`):

- a layer x head grid of thumbnails coloured by each head's label (click or Enter opens it),
- a token view: hover or click a token to shade every other token by the attention it gives
  them (or, reversed, by the attention they give it), the weights written beside each token,
- the pattern matrix with token labels, and the head's label, confidence and top scores.

``show_attention(cache, tokens)`` is the notebook entry point: the object renders inline in
Jupyter (``_repr_html_``) and writes the same page with ``.save(path)``.

Size: a weight is one byte (``round(w * 255)``, steps of 1/255, shown with two decimals), a
causal pattern keeps only its lower triangle, and bytes are base64 in the page, so a 30-layer
decoder on 3 texts of 64 tokens is 2.3 MB (BENCHMARKS.md, "Attention explorer").
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interp.errors import InterpError

__all__ = ["AttentionView", "Doc", "HeadInfo", "head_infos", "quantise", "show_attention"]

#: score columns of the head taxonomy (analyses.heads) shown beside a head, all shares in [0, 1]
SCORE_NAMES = ("prev_token", "positional_share", "induction", "duplicate", "sink", "punct",
               "semantic", "syntax_accuracy", "entropy_norm", "rand_prev_token")


@dataclass(frozen=True)
class HeadInfo:
    """What the taxonomy says about one head: its label, the confidence of that label and a
    few scores (name -> value) shown beside the pattern."""

    label: str
    confidence: float = float("nan")
    scores: tuple[tuple[str, float], ...] = ()


@dataclass
class Doc:
    """One text's patterns: ``patterns`` [layer, head, q, k] float in [0, 1] for the layers in
    ``layers``; ``tokens`` one label per position; ``title`` what the selector shows."""

    title: str
    tokens: list[str]
    patterns: np.ndarray
    layers: list[int]
    text: str = ""  # the whole text, shown above the views (the title may be shortened)

    def __post_init__(self) -> None:
        p = self.patterns
        if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
            raise InterpError(f"patterns must be [layer, head, q, k] with q == k, got shape "
                              f"{tuple(p.shape)}.")
        if len(self.tokens) != p.shape[-1]:
            raise InterpError(f"{len(self.tokens)} token labels for {p.shape[-1]} positions in "
                              f"{self.title!r}; pass one label per position.")
        if len(self.layers) != p.shape[0]:
            raise InterpError(f"{len(self.layers)} layer numbers for {p.shape[0]} layers of "
                              "patterns.")


def quantise(patterns: np.ndarray) -> tuple[bytes, bool]:
    """[layer, head, q, k] weights -> (bytes, causal): one byte per weight, ``round(w*255)``.

    When every weight above the diagonal is zero (a causal model) only row q's first q+1
    keys are kept (the lower triangle, row by row), halving the page; the page decodes both
    layouts. The error of a weight is at most 1/510, under the two decimals shown.
    """
    p = np.clip(np.nan_to_num(np.asarray(patterns, dtype=np.float32)), 0.0, 1.0)
    q8 = np.rint(p * 255.0).astype(np.uint8)
    n = p.shape[-1]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    causal = bool(n > 1 and not q8[..., upper].any())
    if not causal:
        return q8.tobytes(), False
    lower = ~upper  # row-major order of the lower triangle equals the page's row-by-row read
    return q8[..., lower].tobytes(), True


def head_infos(labels: Any) -> dict[tuple[int, int], HeadInfo]:
    """Labels from the taxonomy's frame (``analyses.heads``: columns layer, head, label,
    confidence and score columns), from records with those keys, or from a mapping
    ``{(layer, head): HeadInfo | label}``."""
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {(int(k[0]), int(k[1])): (v if isinstance(v, HeadInfo) else HeadInfo(str(v)))
                for k, v in labels.items()}
    records = labels.to_dict("records") if hasattr(labels, "to_dict") else list(labels)
    out = {}
    for r in records:
        if not {"layer", "head", "label"} <= set(r):
            raise InterpError("labels need columns layer, head and label (the frame "
                              "analyses.heads.analyze(...).heads, or its heads.csv).")
        scores = []
        for name in SCORE_NAMES:
            v = r.get(name)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                scores.append((name, float(v)))
        scores.sort(key=lambda s: -s[1])
        conf = r.get("confidence", float("nan"))
        out[(int(r["layer"]), int(r["head"]))] = HeadInfo(
            str(r["label"]), float(conf) if conf is not None else float("nan"),
            tuple(scores[:5]))
    return out


@dataclass
class AttentionView:
    """The explorer over several texts (see the module docstring). ``model`` names the model
    on the page; ``labels`` are per-head taxonomy results; ``layer``/``head`` the head shown
    first; ``notes`` extra sentences for the page (what was cut or subsampled)."""

    docs: list[Doc]
    model: str = "model"
    labels: dict[tuple[int, int], HeadInfo] = field(default_factory=dict)
    layer: int | None = None
    head: int | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.docs:
            raise InterpError("the explorer needs at least one text.")
        n_heads = {d.patterns.shape[1] for d in self.docs}
        layer_sets = {tuple(d.layers) for d in self.docs}
        if len(n_heads) != 1 or len(layer_sets) != 1:
            raise InterpError("every text must have the same layers and heads in the explorer.")
        layers = self.docs[0].layers
        n_h = next(iter(n_heads))
        if self.head is not None and self.layer is None:
            raise InterpError("head= needs layer= too (pass layer=L, head=H).")
        if self.layer is not None and self.layer not in layers:
            shown = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
            raise InterpError(f"layer {self.layer} is out of range: the patterns cover layers "
                              f"{shown}; pass one of them.")
        if self.head is not None and not 0 <= self.head < n_h:
            raise InterpError(f"head {self.head} is out of range: the model has {n_h} heads per "
                              f"layer (0-{n_h - 1}).")

    @property
    def n_heads(self) -> int:
        return int(self.docs[0].patterns.shape[1])

    def payload(self) -> dict:
        """Everything the page's script reads, as JSON-ready values (bytes as base64)."""
        texts = []
        for d in self.docs:
            data, causal = quantise(d.patterns)
            texts.append({"title": d.title, "text": d.text or d.title,
                          "tokens": list(d.tokens), "causal": causal,
                          "data": base64.b64encode(data).decode("ascii")})
        heads = {}
        for (li, hi), info in sorted(self.labels.items()):
            conf = info.confidence if math.isfinite(info.confidence) else None
            heads[f"{li},{hi}"] = {"label": info.label, "confidence": conf,
                                   "scores": [[k, round(v, 4)] for k, v in info.scores]}
        first_layer = self.layer if self.layer is not None else self.docs[0].layers[0]
        return {"model": self.model, "layers": list(self.docs[0].layers),
                "n_heads": self.n_heads, "texts": texts, "heads": heads, "notes": self.notes,
                "start": {"layer": first_layer, "head": self.head or 0}}

    def to_html(self) -> str:
        """The whole page: one self-contained HTML document."""
        from interp.viz.page import render_page

        return render_page(self.payload())

    def _repr_html_(self) -> str:
        """Jupyter shows the page in a sandboxed iframe (its own document, so its script and
        styles never touch the notebook's); ``srcdoc`` keeps it inline, with no file."""
        doc = html.escape(self.to_html(), quote=True)
        return (f'<iframe srcdoc="{doc}" style="width:100%;height:900px;border:0" '
                'sandbox="allow-scripts" title="attention explorer"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (UTF-8) and return it; it opens from disk offline."""
        path = Path(path)
        if path.is_dir():
            raise InterpError(f"{path} is a folder; pass a file name such as {path}/explorer.html.")
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _pattern_layers(cache: Any) -> dict[int, np.ndarray]:
    """Layer -> pattern [batch, head, q, k] for every ``blocks.{l}.attn.hook_pattern`` held."""
    keys = list(cache.keys()) if hasattr(cache, "keys") else []
    out = {}
    for k in keys:
        parts = str(k).split(".")
        if len(parts) == 4 and parts[0] == "blocks" and parts[2:] == ["attn", "hook_pattern"]:
            t = cache[k]
            t = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            out[int(parts[1])] = t if t.ndim == 4 else t[None]
    if not out:
        raise InterpError("the cache holds no attention patterns; run model.run_with_cache("
                          "tokens, names_filter=lambda n: n.endswith('hook_pattern')) and pass "
                          "that cache.")
    return dict(sorted(out.items()))


def _token_lists(tokens: Any, batch: int) -> list[list[str]]:
    """One list of labels per batch row: a flat list of strings is one text."""
    if isinstance(tokens, str):
        raise InterpError("tokens must be one label per position (model.to_str_tokens(text)), "
                          "not a string.")
    rows = list(tokens)
    if rows and all(isinstance(t, str) for t in rows):
        rows = [rows]
    rows = [[str(t) for t in r] for r in rows]
    if len(rows) != batch:
        raise InterpError(f"{len(rows)} token lists for a cache of {batch} texts; pass one list "
                          "of labels per batch row.")
    return rows


def show_attention(cache: Any, tokens: Sequence[str] | Sequence[Sequence[str]],
                   layer: int | None = None, head: int | None = None, *,
                   labels: Any = None, model: str = "model",
                   titles: Iterable[str] | None = None) -> AttentionView:
    """The explorer over a cache's attention patterns, for Jupyter or a file.

    ``cache``: a ``run_with_cache`` result (or dict) holding ``blocks.{l}.attn.hook_pattern``;
    ``tokens``: the labels of its positions (``model.to_str_tokens(text)``), or one list per
    batch row (several texts, each with a selector entry); ``layer``/``head``: the head shown
    first; ``labels``: the head taxonomy's frame (``analyses.heads.analyze(model).heads``) to
    colour the grid and list each head's label, confidence and top scores.

    >>> import torch, interp
    >>> cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=50, n_ctx=16)
    >>> model = interp.HookedTransformer(cfg)
    >>> _, cache = model.run_with_cache(torch.arange(5)[None])
    >>> view = interp.show_attention(cache, list("abcde"), layer=1, head=0)
    >>> len(view.docs), view.n_heads, view._repr_html_().startswith("<iframe srcdoc=")
    (1, 2, True)
    """
    pats = _pattern_layers(cache)
    batch = {p.shape[0] for p in pats.values()}
    rows = _token_lists(tokens, next(iter(batch)))
    names = list(titles) if titles is not None else [" ".join(r)[:60] for r in rows]
    docs = []
    for b, labels_b in enumerate(rows):
        stack = np.stack([p[b] for p in pats.values()])
        if len(labels_b) != stack.shape[-1]:
            raise InterpError(f"text {b} has {len(labels_b)} token labels but the cache has "
                              f"{stack.shape[-1]} positions; pass one label per position "
                              "(model.to_str_tokens of the same text).")
        docs.append(Doc(names[b] if b < len(names) else f"text {b}", labels_b, stack,
                        list(pats)))
    return AttentionView(docs, model=model, labels=head_infos(labels), layer=layer, head=head)
