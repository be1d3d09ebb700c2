"""``interp explore`` and the reports' explorer: attention patterns as an interactive page.

The page (``explorer.html``, written beside ``index.html``) is :mod:`interp.viz`'s: one
self-contained file, its script and data inline, no network. This module picks the texts,
runs the head taxonomy for the grid's colours (:func:`analyses.heads.analyze`), calls
:func:`analyses.explorer.explore` and wraps the page in a report section. The head-taxonomy
section attaches the same page, labelled by its own taxonomy run (:func:`explorer_files`), so
every report that records patterns carries an explorer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pandas as pd

from analyses import explorer as X
from analyses import heads as H
from analyses.app.cli import (
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    write_report,
)
from analyses.app.paths import shown_path
from analyses.app.report import Section
from analyses.app.sections._heads_inputs import SAMPLE_TEXT, check_text_file, resolve_source
from interp.errors import InterpError
from interp.progress import progress_bar
from interp.viz.attention import head_infos

if TYPE_CHECKING:
    from interp import HookedTransformer
    from interp.viz import AttentionView

__all__ = ["REPORT_MAX_TOKENS", "explore_cmd", "explorer_files", "explorer_section",
           "report_texts"]

#: tokens per text in a report's explorer: 10 texts of 48 tokens on a 30 x 9-head decoder are at
#: most 4.2 MB; the packaged sample's sentences (15-25 tokens) give about 1 MB
REPORT_MAX_TOKENS = 48
DEFAULT_N_RANDOM = 16

METHOD = (
    "One forward pass per text with `blocks.{{l}}.attn.hook_pattern` cached (each text alone: "
    "no padding), every layer and head. The page is one self-contained HTML file (script, "
    "styles and data inline; a Content-Security-Policy forbids every request), so it opens "
    "from disk with the network off. Weights are stored with 8 bits (round(w x 255), at most "
    "0.002 off, shown with two decimals); a causal model keeps only the lower triangle. Grid "
    "colours are the head taxonomy's labels (same rules and thresholds as the head-taxonomy "
    "section) on these texts and {n_random} repeated random-token sequences; colour-blind-safe "
    "palettes (Paul Tol's muted for labels, viridis for weights), label abbreviations written "
    "under each thumbnail, keyboard navigation (arrow keys in the grid and the token lists)."
)
SOURCE = (
    "Vig (2019), *A Multiscale Visualization of Attention in the Transformer Model*, ACL demos "
    "(bertviz's head and token views, written anew here); Clark, Khandelwal, Levy and Manning "
    "(2019), *What Does BERT Look At?*, BlackboxNLP (head patterns and their taxonomy)."
)


def report_texts(opts: dict, limit: int = X.MAX_TEXTS) -> list[str]:
    """The first ``limit`` texts of what a heads report read: its --text file's lines, its
    CoNLL-U sentences, else the packaged sample."""
    from analyses import parses

    if opts.get("conllu") is not None:
        out = []
        for s in parses.read_conllu(opts["conllu"]):
            out.append(s.text)
            if len(out) == limit:
                break
        return out
    path = Path(opts["text_file"]) if opts.get("text_file") is not None else SAMPLE_TEXT
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.strip())
            if len(out) == limit:
                break
    return out


def explorer_files(model: HookedTransformer, heads: pd.DataFrame | None, texts: list[str], *,
                   model_name: str, notes: list[str] | None = None,
                   max_tokens: int | None = REPORT_MAX_TOKENS,
                   layer: int | None = None, head: int | None = None,
                   ) -> tuple[dict[str, str], AttentionView | None, str]:
    """(``{"explorer.html": page}`` or {}, the view, one sentence for the findings).

    A model without a tokenizer is shown on repeated random tokens; one the explorer cannot
    show (encoder-decoder) gets no page and a sentence saying why, so a heads report still
    writes.
    """
    cut = None if max_tokens is None else min(max_tokens, int(model.cfg.n_ctx))
    try:
        if getattr(model, "tokenizer", None) is None and layer is None:
            view = X.explore_random(model, heads=heads, model_name=model_name)
        else:
            view = X.explore(model, texts, heads=heads, max_tokens=cut, model_name=model_name,
                             notes=notes or [], layer=layer, head=head)
    except InterpError as e:
        if layer is not None or head is not None:
            raise
        try:  # a tokenizer that cannot read the texts (a trained model's word list)
            view = X.explore_random(model, heads=heads, model_name=model_name, note=(
                f"The report's texts cannot be read by this model ({e}): the text is a "
                "repeated random token sequence, each token shown by its id."))
        except InterpError:
            return {}, None, f"No attention explorer: {e}"
    page = view.to_html()
    n_tok = sum(len(d.tokens) for d in view.docs)
    return ({"explorer.html": page}, view,
            f"Attention explorer (`explorer.html`, {len(page.encode()) / 1e6:.2f} MB, opens "
            f"offline): {len(view.docs)} text(s), {n_tok} tokens, every layer and head, grid "
            "coloured by the labels above.")


def explorer_section(model: HookedTransformer, texts: list[str], opts: dict) -> Section:
    """The ``explorer`` section: the taxonomy on ``texts`` (plus repeated random tokens for
    the induction scores), then the page over ``texts``."""
    from analyses.app import plots

    t0 = time.perf_counter()
    n_random = int(opts.get("n_random") or DEFAULT_N_RANDOM)
    # the patterns first: a bad text, layer or head fails before the (slower) taxonomy
    view = X.explore(model, texts, layer=opts.get("layer"), head=opts.get("head"),
                     max_tokens=opts.get("max_tokens"), model_name=opts["model_name"])
    res = H.analyze(model, texts=texts, n_random=n_random,
                    batch_size=int(opts.get("batch_size") or 8), seed=int(opts.get("seed") or 0),
                    progress=opts.get("progress"))
    view.labels = head_infos(res.heads)
    page = view.to_html()
    size = len(page.encode())
    text_table = pd.DataFrame({"text": [d.title for d in view.docs],
                               "tokens": [len(d.tokens) for d in view.docs]})
    counts = res.heads["label"].value_counts()
    summary = [f"`explorer.html`: {len(view.docs)} texts, {int(text_table['tokens'].sum())} "
               f"tokens, {len(res.heads)} heads, {size / 1e6:.2f} MB; open it in a browser "
               "(no network needed).",
               "Head labels on these texts: " + ", ".join(f"{v} {k}" for k, v in
                                                          counts.head(5).items()) + "."]
    return Section(
        key="explorer", title="Attention explorer",
        method=METHOD.format(n_random=n_random), source=SOURCE,
        data="Texts: " + "; ".join(f"`{d.title}`" for d in view.docs) + ".",
        findings=[f"Attention explorer (`explorer.html`, {size / 1e6:.2f} MB, opens offline): "
                  f"{len(view.docs)} texts, every layer and head, grid coloured by the labels "
                  "in `explorer_heads.csv`.", *view.notes],
        tables={"explorer_texts": text_table, "explorer_heads": res.heads},
        show_tables={"explorer_texts": len(text_table)},
        figures={"explorer_labels": plots.label_map(res.heads, title="Head labels (grid "
                                                    "colours of the explorer)")},
        timings={"total": time.perf_counter() - t0},
        summary=summary, summary_figure="explorer_labels",
        files={"explorer.html": page})


@cli.command("explore")
@model_argument()
@click.option("--text", "texts", multiple=True,
              help="A text to explore (repeatable: several texts, one selector) [default: the "
                   "first 3 sentences of the packaged sample].")
@click.option("--texts", "texts_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A file with one text per line (the first 10 are used).")
@click.option("--layer", type=int, default=None, help="Layer of the head shown first.")
@click.option("--head", type=int, default=None, help="Head shown first (needs --layer).")
@click.option("--n-random", type=click.IntRange(min=1), default=DEFAULT_N_RANDOM,
              show_default=True, help="Repeated random-token sequences for the taxonomy.")
@common_options
@click.pass_context
def explore_cmd(ctx: click.Context, model: str, texts: tuple[str, ...], texts_file: Path | None,
                layer: int | None, head: int | None, n_random: int, out: Path | None,
                batch_size: int, max_tokens: int | None, device: str, dtype: str, seed: int,
                quiet: bool, force: bool) -> None:
    """An interactive attention explorer of MODEL on texts: explorer.html in the --out report.

    One self-contained page (no network, no server): a layer x head grid coloured by the head
    taxonomy, a token view (hover a token: where it attends, or what attends to it), the
    pattern matrix, and each head's label, confidence and top scores. --max-tokens cuts each
    text; a text longer than the model's context is refused.

    \b
    Example:
      interp explore minilm --text "The cat sat on the mat." --out reports/explore
      interp explore smollm2-135m --text "John gave Mary a drink." --layer 3 --out reports/smol
    """
    if head is not None and layer is None:
        raise click.BadParameter("--head needs --layer", param_hint="'--head'")
    chosen = [t for t in texts if t.strip()]
    if texts_file is not None:
        check_text_file(texts_file)
        chosen += report_texts({"text_file": texts_file})
    if texts and not chosen:
        raise click.BadParameter("the text is empty", param_hint="'--text'")
    chosen = chosen or report_texts({}, limit=3)
    out = prepare_out(ctx, out, force)
    m = load_model(resolve_source(model), device, dtype, seed=seed)
    opts: dict[str, Any] = {"model_name": shown_path(model), "n_random": n_random,
                            "batch_size": batch_size, "seed": seed, "layer": layer,
                            "head": head, "max_tokens": max_tokens,
                            "progress": progress_bar(quiet)}
    section = explorer_section(m, chosen, opts)
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, quiet=quiet, title=f"interp explore: {model}")
