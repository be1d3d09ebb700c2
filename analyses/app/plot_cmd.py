"""``interp plot``: attention patterns of a model on one text, written as a small report.

One forward pass with the pattern hooks cached, then one of three views: a single head with
every token labelled (``--layer --head``), a layer's heads side by side (``--layer``), or the
layer x head overview grid. The report's table holds every weight drawn, so a figure can be
checked or redrawn from ``data/patterns.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from analyses.app import common
from analyses.app.errors import CliError
from analyses.app.paths import shown_path
from analyses.app.report import Section

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from interp import HookedTransformer

__all__ = ["DEFAULT_TEXT", "plot_cmd"]

DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to Mary."


@click.command("plot")
@common.model_argument()
@click.option("--text", default=DEFAULT_TEXT, show_default=True, help="The text to run.")
@click.option("--layer", type=int, default=None, help="Layer to plot [default: all].")
@click.option("--head", type=int, default=None, help="Head to plot (needs --layer).")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common.common_options
@click.pass_context
def plot_cmd(ctx: click.Context, model: str, text: str, layer: int | None, head: int | None,
             svg: bool, out: Path | None, batch_size: int, max_tokens: int | None,
             device: str, dtype: str, seed: int, quiet: bool, force: bool) -> None:
    """Plot attention patterns of MODEL on a text, as a small report.

    With --layer and --head: that head's pattern with every token labelled. With --layer
    only: a grid of that layer's heads. With neither: a layer x head overview grid (pick
    a head from it, then plot it alone). --max-tokens cuts the text to that many tokens.

    \b
    Example:
      interp plot --text "The cat sat on the mat." --out plots/cat
      interp plot minilm --text "The cat sat on the mat." --layer 2 --out plots/l2
      interp plot smollm2-135m --text "A B C A B" --layer 3 --head 0 --out plots/ind --svg
    """
    if head is not None and layer is None:
        raise click.BadParameter("--head needs --layer", param_hint="'--head'")
    if not text.strip():
        raise click.BadParameter("the text is empty", param_hint="'--text'")
    out = common.prepare_out(ctx, out, force)  # fail before the (slow) model load
    t0 = time.perf_counter()
    # common.load_model, looked up when called, so a test can substitute a stand-in model.
    m = common.load_model(model, device, dtype, seed=seed)
    _check_model(m, layer, head)
    tokens, str_tokens, note = _tokenize(m, text)
    tokens = tokens.to(m.device) if hasattr(m, "device") else tokens
    if max_tokens is not None and tokens.shape[-1] > max_tokens:
        tokens, str_tokens = tokens[..., :max_tokens], str_tokens[:max_tokens]
    layers = [layer] if layer is not None else list(range(int(m.cfg.n_layers)))
    pats = _patterns(m, tokens, layers)  # [layer, head, q, k]
    n_k = pats.shape[-1]
    if len(str_tokens) != n_k:  # a tokenizer that adds specials to one and not the other
        str_tokens = [f"{i}" for i in range(n_k)]
    figures, scope = _figures(pats, str_tokens, shown_path(model), text, layer, head,
                              n_layers=int(m.cfg.n_layers), n_heads=int(m.cfg.n_heads))
    heads = [head] if head is not None else list(range(pats.shape[1]))
    table = _pattern_table(pats, layers, heads, str_tokens)
    section = _plot_section(scope, text, note, n_k, table, figures, time.perf_counter() - t0)
    section.files = _explorer(pats, str_tokens, layers, text, shown_path(model), layer, head)
    common.write_report([section], out=out, force=force, model_source=model, model=m,
                        seed=seed, ctx=ctx, svg=svg, quiet=quiet, title=f"interp plot: {model}")


def _explorer(pats: np.ndarray, str_tokens: list[str], layers: list[int], text: str,
              name: str, layer: int | None, head: int | None) -> dict[str, str]:
    """The same patterns as an interactive page (:mod:`interp.viz`), unlabelled: ``interp
    explore`` adds the head taxonomy's labels."""
    from interp.viz.attention import AttentionView, Doc

    doc = Doc(text if len(text) <= 70 else text[:67] + "...", str_tokens, pats, layers, text=text)
    view = AttentionView([doc], model=name, layer=layer, head=head,
                         notes=["No head labels here: `interp explore` runs the head taxonomy "
                                "and colours the grid by it."])
    return {"explorer.html": view.to_html()}


def _check_model(m: HookedTransformer, layer: int | None, head: int | None) -> None:
    """Refuse a layer or head the model does not have, and encoder-decoder models."""
    n_layers, n_heads = int(m.cfg.n_layers), int(m.cfg.n_heads)
    if layer is not None and not 0 <= layer < n_layers:
        raise click.BadParameter(
            f"layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})",
            param_hint="'--layer'")
    if head is not None and not 0 <= head < n_heads:
        raise click.BadParameter(
            f"head {head} is out of range: the model has {n_heads} heads (0-{n_heads - 1})",
            param_hint="'--head'")
    if getattr(m.cfg, "architecture", "decoder") == "encoder_decoder":
        raise CliError("interp plot supports decoder and encoder models; this one is "
                       "encoder-decoder (hook its encoder.{l}.attn.hook_pattern from Python)")


def _tokenize(model: HookedTransformer, text: str) -> tuple[torch.Tensor, list[str], str]:
    """(token ids [1, pos], one label per token, a note for the report).

    A random model built from a .json config has no tokenizer; rather than refuse, use
    the text's UTF-8 bytes as token ids (needs d_vocab >= 256), which is enough to look
    at positional structure (previous-token, sink, local heads).
    """
    import torch

    if getattr(model, "tokenizer", True) is not None:
        return model.to_tokens(text), [str(t) for t in model.to_str_tokens(text)], ""
    vocab = int(getattr(model.cfg, "d_vocab", 0))
    if vocab < 256:
        raise CliError(f"the model has no tokenizer and d_vocab={vocab} < 256, so the text "
                       "cannot be fed to it as bytes")
    data = text.encode("utf-8")
    ids = torch.tensor([list(data)], dtype=torch.long)
    labels = [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in data]
    return ids, labels, "The model has no tokenizer: the text's UTF-8 bytes are the token ids."


def _patterns(m: HookedTransformer, tokens: torch.Tensor, layers: list[int]) -> np.ndarray:
    """The attention patterns of ``layers`` on one text, ``[layer, head, q, k]`` float32.

    The forward's own output is not used; its default return type is what every model can
    give (logits, or the hidden states of a bare encoder such as ``minilm``).
    """
    import numpy as np
    import torch

    with torch.no_grad():
        _, cache = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return np.stack([cache["pattern", li][0].float().cpu().numpy() for li in layers])


def _figures(pats: np.ndarray, str_tokens: list[str], name: str, text: str,
             layer: int | None, head: int | None, *, n_layers: int,
             n_heads: int) -> tuple[dict[str, Any], str]:
    """(the one figure asked for, keyed by its file stem; the scope in words for the title)."""
    from analyses.app import plots

    short = text if len(text) <= 60 else text[:57] + "..."
    if head is not None:
        figure = plots.head_pattern(pats[0, head], str_tokens,
                                    title=f"{name}, layer {layer}, head {head}: {short!r}")
        return {f"pattern_L{layer}H{head}": figure}, f"layer {layer}, head {head}"
    if layer is not None:
        figure = plots.head_grid(pats[0], str_tokens, layer=layer,
                                 title=f"{name}, layer {layer}, heads 0-{n_heads - 1}: {short!r}")
        return {f"pattern_L{layer}": figure}, f"layer {layer}, all {n_heads} heads"
    figure = plots.layer_head_grid(pats, str_tokens,
                                   title=f"{name}, every layer and head: {short!r}")
    return {"pattern_all": figure}, f"all {n_layers} layers x {n_heads} heads"


def _pattern_table(pats: np.ndarray, layers: list[int], heads: list[int],
                   str_tokens: list[str]) -> pd.DataFrame:
    """Every weight drawn, one row per (layer, head, query, key), tokens named."""
    import numpy as np
    import pandas as pd

    n_q, n_k = pats.shape[-2:]
    li, hi, qi, ki = np.meshgrid(np.arange(len(layers)), np.array(heads), np.arange(n_q),
                                 np.arange(n_k), indexing="ij")
    return pd.DataFrame({
        "layer": np.array(layers)[li.ravel()],
        "head": hi.ravel(),
        "q": qi.ravel(),
        "k": ki.ravel(),
        "q_token": np.array(str_tokens, dtype=object)[qi.ravel()],
        "k_token": np.array(str_tokens, dtype=object)[ki.ravel()],
        "weight": pats[li.ravel(), hi.ravel(), qi.ravel(), ki.ravel()],
    })


def _plot_section(scope: str, text: str, note: str, n_k: int, table: pd.DataFrame,
                  figures: dict[str, Any], seconds: float) -> Section:
    """The report section: method and sources, the strongest edges in words, table, figure."""
    # The strongest non-trivial edges, in words: what a reader looks for first.
    top = table.sort_values("weight", ascending=False, kind="stable").head(5)
    findings = [
        f"L{r.layer}H{r.head}: query {r.q} {r.q_token!r} puts {r.weight:.2f} on key {r.k} "
        f"{r.k_token!r}" for r in top.itertuples()
    ]
    return Section(
        key="plot",
        title=f"Attention patterns ({scope})",
        method=(
            "One forward pass with the attention pattern hooks cached "
            "(`blocks.{l}.attn.hook_pattern`, post-softmax, `[batch, head, q, k]`). Rows are "
            "queries (the attending token), columns keys. `␣` marks a leading space, `↵` a "
            "newline in a token."
        ),
        source=(
            "Attention-pattern visualisation as in Clark, Khandelwal, Levy and Manning (2019), "
            "*What Does BERT Look At? An Analysis of BERT's Attention*, BlackboxNLP; and "
            "Elhage et al. (2021), *A Mathematical Framework for Transformer Circuits*, "
            "Transformer Circuits Thread."
        ),
        data=f"The text given with `--text` ({n_k} tokens): `{text}`. {note}".strip(),
        findings=findings,
        tables={"patterns": table},
        figures=figures,
        timings={"total": seconds},
        summary=_plot_summary(table),
        summary_figure=next(iter(figures)),
    )


def _plot_summary(table: pd.DataFrame) -> list[str]:
    """The summary, read from ``patterns.csv``: the strongest single weight, and the heads that
    attend most to the first, the previous and (when visible) the next token, mean over
    queries."""
    top = table.loc[table["weight"].idxmax()]
    out = [f"Strongest weight: L{top['layer']}H{top['head']}, query {top['q']} "
           f"{top['q_token']!r} puts {top['weight']:.2f} on key {top['k']} {top['k_token']!r}."]
    n_q = int(table["q"].max()) + 1
    for what, rows in (("the first token", table[table["k"] == 0]),
                       ("the previous token", table[table["k"] == table["q"] - 1]),
                       ("the next token", table[table["k"] == table["q"] + 1])):
        mean = rows.groupby(["layer", "head"])["weight"].mean()
        if rows.empty or not float(mean.max()) > 0:  # a causal model never sees the next token
            continue
        (layer, head), value = mean.idxmax(), float(mean.max())
        out.append(f"Most attention to {what}: L{layer}H{head}, {value:.2f} on average over "
                   f"{len(rows) // len(mean)} of {n_q} queries.")
    return out
