"""Plots: right number of axes and labels, readable tokens, PNGs written, figures closed."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from analyses.app import plots


def causal_patterns(*shape: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = shape[-1]
    a = np.tril(rng.random((*shape[:-1], n)))
    return a / a.sum(-1, keepdims=True)


TOKENS = ["<s>", "ĠThe", "Ġcat", "Ġcost", "Ġ$", "5", "Ċ", "##ing", "▁x", "$x^2$"]


def heat_axes(fig: Figure) -> list:
    """Axes that draw data (colour bars excluded)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]


def test_clean_token() -> None:
    assert plots.clean_token("ĠThe") == "␣The"
    assert plots.clean_token("▁x") == "␣x"
    assert plots.clean_token("Ċ") == "↵"
    assert plots.clean_token("$x^2$") == r"\$x^2\$"
    assert plots.clean_token("") == "∅"
    assert plots.clean_token("a" * 40).endswith("…")
    assert len(plots.clean_token("a" * 40)) == 14


def test_head_pattern_labels(tmp_path: Path) -> None:
    fig = plots.head_pattern(causal_patterns(10, 10), TOKENS, title="L0H1 costs $5")
    ax = heat_axes(fig)[0]
    xl = [t.get_text() for t in ax.get_xticklabels()]
    yl = [t.get_text() for t in ax.get_yticklabels()]
    assert xl == yl == [plots.clean_token(t) for t in TOKENS]
    assert "Ġ" not in "".join(xl)
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert len(fig.axes) == 2  # heatmap + colour bar
    paths = plots.save_figure(fig, tmp_path / "head")
    assert paths == [tmp_path / "head.png"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def test_head_pattern_scales_with_tokens() -> None:
    small = plots.head_pattern(causal_patterns(5, 5), TOKENS[:5], title="s")
    toks = [f"t{i}" for i in range(40)]
    big = plots.head_pattern(causal_patterns(40, 40), toks, title="b")
    assert big.get_size_inches()[0] > small.get_size_inches()[0] * 2
    assert len(heat_axes(big)[0].get_xticklabels()) == 40  # every token labelled


def test_head_pattern_rectangular_and_errors() -> None:
    fig = plots.head_pattern(np.ones((2, 4)) / 4, ["a", "b", "c", "d"], title="x",
                             query_tokens=["c", "d"])
    assert [t.get_text() for t in heat_axes(fig)[0].get_yticklabels()] == ["c", "d"]
    with pytest.raises(ValueError, match="tokens"):
        plots.head_pattern(np.ones((3, 3)), ["a", "b"], title="x")
    with pytest.raises(ValueError, match=r"\[q, k\]"):
        plots.head_pattern(np.ones(3), ["a", "b", "c"], title="x")


def test_head_grid_axes(tmp_path: Path) -> None:
    fig = plots.head_grid(causal_patterns(6, 10, 10), TOKENS, layer=3, title="layer 3")
    axes = heat_axes(fig)
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes] == [f"L3H{h}" for h in range(6)]
    labels = [plots.clean_token(t, max_chars=8) for t in TOKENS]
    # 6 heads on a 2 x 4 grid: x labels under heads 2-5 (lowest in their column),
    # y labels beside heads 0 and 4 (first column)
    with_x = [h for h, ax in enumerate(axes) if ax.get_xticklabels()]
    with_y = [h for h, ax in enumerate(axes) if ax.get_yticklabels()]
    assert with_x == [2, 3, 4, 5] and with_y == [0, 4]
    assert [t.get_text() for t in axes[4].get_xticklabels()] == labels
    long = plots.head_grid(causal_patterns(2, 30, 30), [f"t{i}" for i in range(30)],
                           layer=0, title="long")
    assert not any(ax.get_xticklabels() for ax in heat_axes(long))  # too small to label
    plots.save_figure(fig, tmp_path / "grid")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_layer_head_grid_axes() -> None:
    fig = plots.layer_head_grid(causal_patterns(3, 4, 6, 6), TOKENS[:6])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 12
    assert panels[0].get_title() == "H0" and panels[0].get_ylabel() == "L0"
    big = plots.layer_head_grid(causal_patterns(30, 9, 4, 4), TOKENS[:4])
    w, h = big.get_size_inches()
    assert max(w, h) * 100 <= 2100  # stays a reasonable image


def test_label_map() -> None:
    df = pd.DataFrame({
        "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
        "label": ["sink", "induction", "sink", "previous-token"],
        "confidence": [0.9, 0.8, 0.7, 0.6],
    })
    fig = plots.label_map(df)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["induction (1)", "previous-token (1)", "sink (2)"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.60", "0.70", "0.80", "0.90"]
    with pytest.raises(ValueError, match="missing column"):
        plots.label_map(df.drop(columns="confidence"))


def test_heatmap_bars_lines(tmp_path: Path) -> None:
    m = pd.DataFrame(np.arange(6).reshape(2, 3) - 2.0, index=["e0", "e1"],
                     columns=["code", "news", "wiki $"])
    fig = plots.heatmap(m, title="MI", xlabel="domain", ylabel="expert", cmap="RdBu_r",
                        center=0)
    ax = heat_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["code", "news", r"wiki \$"]
    assert len(ax.texts) == 6  # small matrix: annotated
    assert ax.get_xlabel() == "domain"
    df = pd.DataFrame({"layer": [0, 1, 2, 0, 1, 2], "kl": [1, 2, 3, 2, 3, 4.0],
                       "mask": ["a"] * 3 + ["b"] * 3})
    fb = plots.bars(df, "layer", "kl", hue="mask", title="KL")
    fl = plots.lines(df, "layer", "kl", hue="mask", title="KL")
    for f in (fb, fl):
        assert f.axes[0].get_title() == "KL" and f.axes[0].get_ylabel() == "kl"
    plots.save_figure(fb, tmp_path / "bars", svg=True)
    assert (tmp_path / "bars.png").exists() and (tmp_path / "bars.svg").exists()
    with pytest.raises(ValueError, match="no column"):
        plots.bars(df, "nope", "kl")


def test_save_figure_downscales_and_closes(tmp_path: Path) -> None:
    from PIL import Image

    fig, ax = plt.subplots(figsize=(40, 10))
    ax.plot([0, 1])
    plots.save_figure(fig, tmp_path / "wide")
    assert not plt.fignum_exists(fig.number)
    with Image.open(tmp_path / "wide.png") as im:
        assert max(im.size) <= plots.MAX_PNG_PIXELS + 1


# ------------------------------------------------------------- `interp plot` on an encoder


def _titles(fig: Figure) -> str:
    """Every title drawn on a figure (suptitle and axes titles), one string."""
    parts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    return " | ".join(parts + [ax.get_title() for ax in fig.axes])


def test_plot_titles_name_model_layer_and_head() -> None:
    from analyses.app.plot_cmd import _figures

    pats = causal_patterns(1, 4, 6, 6)
    toks = TOKENS[:6]
    figs, scope = _figures(pats, toks, "minilm", "a text", 2, 3, n_layers=6, n_heads=4)
    fig = figs["pattern_L2H3"]
    assert "minilm, layer 2, head 3" in _titles(fig), _titles(fig)
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert scope == "layer 2, head 3"
    figs, _ = _figures(pats, toks, "minilm", "a text", 2, None, n_layers=6, n_heads=4)
    fig = figs["pattern_L2"]
    assert "minilm, layer 2, heads 0-3" in _titles(fig)
    assert all(f"L2H{h}" in _titles(fig) for h in range(4))
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_interp_plot_on_a_bare_encoder(tmp_path: Path) -> None:
    """An encoder without an unembedding (like MiniLM) plots a layer's heads and one head;
    before, the forward behind the plot raised 'no unembedding'."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from analyses.app.cli import cli

    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 300, "n_ctx": 64,
           "architecture": "encoder", "has_unembed": False}
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(cfg))
    for extra, stem in ((["--layer", "1"], "pattern_L1"),
                        (["--layer", "1", "--head", "2"], "pattern_L1H2")):
        out = tmp_path / stem
        result = CliRunner().invoke(cli, ["plot", str(path), "--text", "abcab", *extra,
                                          "--out", str(out), "-q", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        with Image.open(out / "figures" / f"{stem}.png") as im:
            assert min(im.size) > 200
        table = pd.read_csv(out / "data" / "patterns.csv", keep_default_na=False)
        assert table.query("k > q")["weight"].max() > 0  # bidirectional: sees the right side
