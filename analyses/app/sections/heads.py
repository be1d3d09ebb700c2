"""Report section and ``interp heads`` command: the head taxonomy (see :mod:`analyses.heads`).

Thin by design: it picks the input (a CoNLL-U file, a text parsed by spaCy, or repeated random
tokens only), calls :func:`analyses.heads.analyze`, and turns the frames into figures,
findings and tables. ``--compare`` adds a side-by-side section for several models (e.g. one
task trained under sinusoidal, learned, RoPE and ALiBi positions).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import pandas as pd

from analyses import heads as H
from analyses.app.cli import (
    CliError,
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    write_report,
)
from analyses.app.paths import shown_path
from analyses.app.report import Section
from analyses.app.sections import register
from analyses.app.sections._heads_figures import (
    compare_figure,
    focus,
    heat,
    layer_lines,
    syntax_bars,
)
from analyses.app.sections._heads_inputs import (
    check_conllu_file,
    check_text_file,
    inputs,
    resolve_source,
)
from analyses.app.sections.explore import explorer_files, report_texts
from analyses.heads.batches import max_len
from analyses.heads.token_stats import sliding_layers
from interp.errors import InterpError
from interp.progress import Progress, progress_bar

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["build", "build_compare", "check_focus", "compare_figure", "heads_cmd"]

DEFAULT_MAX_TOKENS = 100_000  # covers UD EWT dev (~30k word pieces) with room to spare
DEFAULT_N_RANDOM = 64

SOURCE = (
    "Clark, Khandelwal, Levy and Manning (2019), *What Does BERT Look At? An Analysis of BERT's "
    "Attention*, BlackboxNLP (delimiter and punctuation attention, attention distance and entropy, "
    "word-level dependency accuracy against fixed-offset baselines); Voita, Talbot, Moiseev, "
    "Sennrich and Titov (2019), *Analyzing Multi-Head Self-Attention: Specialized Heads Do the "
    "Heavy Lifting, the Rest Can Be Pruned*, ACL (positional heads: >= 90% of maximum attention at "
    "one offset); Olsson et al. (2022), *In-context Learning and Induction Heads*, Transformer "
    "Circuits Thread (prefix matching and copying on repeated random tokens); Elhage et al. "
    "(2021), *A Mathematical Framework for Transformer Circuits*, Transformer Circuits Thread "
    "(OV-circuit eigenvalue copying score); Xiao, Tian, Chen, Han and Lewis (2024), *Efficient "
    "Streaming Language Models with Attention Sinks*, ICLR (first-token sinks); Vig and Belinkov "
    "(2019), *Analyzing the Structure of Attention in a Transformer Language Model*, BlackboxNLP "
    "(attention against token properties)."
)

METHOD = (
    "Every score streams over batches with running sums from `blocks.{{l}}.attn.hook_pattern` "
    "(hooks reduce each pattern on the fly; nothing is cached). **Positional** (Voita et al.): "
    "the argmax share, i.e. the share of queries whose most-attended non-sink key is at offset o "
    "in -3..+3, over the queries where offset o is possible (`positional_n`: real tokens, not "
    "padding or [CLS]/[SEP]/BOS rows, whose key at q+o exists and is not a sink), so the last "
    "token does not count against a next-token head; positional when one offset takes >= 90%; "
    "previous-token score = mean attention to i-1. **Induction / "
    "duplicate-token**: on `x1..xn x1..xn` (distinct random tokens; BOS or [CLS]/[SEP] as the "
    "model expects), mean attention from a second-copy token to the token after its first "
    "occurrence (prefix matching) and to the first occurrence itself; **OV copying** = "
    "sum(eigenvalues) / sum(|eigenvalues|) of W_E W_V W_O W_U with the norm gains folded in (where "
    "the model has an unembedding). **Sinks**: mean attention share to the first token, BOS, "
    "[CLS], [SEP], any special token, and punctuation. **Range**: with the first/special-token "
    "mass removed and the rest renormalised, mean |q-k| (and its ratio to a uniform head's over "
    "the same keys) and entropy (normalised by log of the number of keys: 1 = uniform). "
    "**Syntactic** (Clark et al. sec. 4.2): attention merged to words (rows averaged over the "
    "query word's pieces, columns summed over the key word's pieces; special tokens and the word "
    "itself ignored); per relation and direction, accuracy = share of gold pairs whose "
    "most-attended word is the partner, against the best fixed offset in -3..+3 (in a causal model "
    "only pairs whose partner precedes the query, offsets -3..-1). UD subtypes count under their "
    "universal relation except `nmod:poss`. **Semantic** (our definition): partial correlation of "
    "the attention weight with the cosine similarity of the two tokens' input embeddings, relative "
    "offset held fixed (pooled within-offset correlation), over pairs of distinct tokens, sink, "
    "special and punctuation keys excluded. **Labels**, first rule that holds: induction (prefix "
    "matching >= {induction}), duplicate-token (>= {duplicate}), previous-token (offset -1 share "
    ">= {positional} or mean attention to i-1 >= {prev_token}), next-token (offset +1 share >= "
    "{positional}), positional (other offset, share >= {positional}), syntactic:<relation> "
    "(beats its baseline by >= {syntax_margin:.0%} on >= {syntax_min_n} pairs, margin >= "
    "{syntax_z} standard errors; not punct/root/dep), semantic (r "
    ">= {semantic}), sink (share >= {sink}), local (distance ratio <= {local}), long-range (>= "
    "{long_range}), uniform (normalised entropy >= {uniform}), else unclassified. Confidence is "
    "the score that fired the rule; for unclassified, 1 minus the strongest score relative to its "
    "threshold."
)


# --------------------------------------------------------------------------- findings


def _hl(r: Any) -> str:
    """"L3H5" for a row (a namedtuple from itertuples or a Series)."""
    if isinstance(r, pd.Series):
        return f"L{int(r['layer'])}H{int(r['head'])}"
    return f"L{int(r.layer)}H{int(r.head)}"


def _findings(res: H.HeadAnalysis, model: HookedTransformer) -> list[str]:
    """The section's findings in words: label counts, the strongest heads of each kind,
    sink shares per layer, syntax against its baseline, semantic heads."""
    h = res.heads
    out = []
    counts = h["label"].value_counts()
    out.append(f"{len(h)} heads: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".")
    for label, score, what in (("previous-token", "prev_token",
                                "mean attention to i-1; argmax: how often i-1 is the "
                                "most-attended key"),
                               ("induction", "induction", "prefix-matching attention"),
                               ("duplicate-token", "duplicate", "attention to the earlier copy")):
        sel = h[h["label"] == label].sort_values("confidence", ascending=False)
        if len(sel):
            parts = []
            for r in sel.head(6).itertuples():
                extra = ""
                if label == "induction" and np.isfinite(r.copying):
                    extra = f", copying {r.copying:+.2f}"
                if label == "previous-token":
                    extra = f", on random tokens {r.rand_prev_token:.2f}"
                    if int(r.positional_offset) == -1:
                        extra += f", argmax at i-1 {r.positional_share:.0%}"
                parts.append(f"{_hl(r)} ({getattr(r, score):.2f}{extra})")
            more = "" if len(sel) <= 6 else ", ..."
            out.append(f"{label.capitalize()} heads ({what}): " + ", ".join(parts) + more)
    best_ind = h.loc[h["induction"].idxmax()]
    if h["label"].ne("induction").all():
        out.append(f"No induction head: the strongest prefix matching is {_hl(best_ind)} at "
                   f"{best_ind['induction']:.2f}.")
    pos = h[h["label"].isin(["next-token", "positional"])]
    if len(pos):
        out.append("Positional heads (most-attended key at one offset, Voita et al.; share of "
                   "the queries where the offset exists): " + ", ".join(
                       f"{_hl(r)} {r.label} (offset {int(r.positional_offset):+d}, "
                       f"{r.positional_share:.0%} of {int(r.positional_n)})"
                       for r in pos.itertuples()) + ".")
    lay = res.layers
    if "sink_first" in lay:
        cls_sep = ""
        if (lay["cls"] > 0).any() or (lay["sep"] > 0).any():
            cls_sep = ("; [CLS] " + ", ".join(f"{x:.2f}" for x in lay["cls"])
                       + "; [SEP] " + ", ".join(f"{x:.2f}" for x in lay["sep"]))
        out.append("Attention share per layer (mean over heads and queries, "
                   f"{res.info['source']}): first token "
                   + ", ".join(f"{x:.2f}" for x in lay["sink_first"]) + cls_sep + "; punctuation "
                   + ", ".join(f"{x:.2f}" for x in lay["punct"]) + ".")
        if res.info["source"] != "repeated random tokens":
            out.append("First-token share per layer on the repeated random tokens: "
                       + ", ".join(f"{x:.2f}" for x in lay["rand_first"]) + ".")
    bs = res.best_syntax.dropna(subset=["accuracy"])
    if len(bs):
        beat = bs[bs["margin"] >= 0.10]
        out.append(f"Syntax: for {len(beat)} of {len(bs)} relations the best head beats the best "
                   "fixed offset by 10 points or more: " + ", ".join(
                       f"{r.relation} {_hl(r)} {r.accuracy:.0%} vs {r.baseline_accuracy:.0%}"
                       for r in beat.itertuples()) + ".")
    sem = h[h["label"] == "semantic"]
    if len(sem):
        out.append("Semantic heads (attention tracks embedding similarity beyond position): "
                   + ", ".join(f"{_hl(r)} (r = {r.semantic:.2f})" for r in sem.itertuples()) + ".")
    if not model.cfg.has_unembed:
        out.append("No unembedding: the OV copying score is not defined for this model (NaN).")
    sliding, window = sliding_layers(model)
    if sliding:
        out.append(f"Sliding-window layers ({', '.join(f'L{i}' for i in sliding)}; window "
                   f"{window}): their range scores (mean distance, distance ratio, normalised "
                   "entropy) are measured within the window, against a uniform head over the "
                   "keys the window lets each query see; long-range there means long for the "
                   "window (heads.csv column 'window')."
                   + (f" The sequences here are at most {max_len(model)} tokens, so the window "
                      "hides no key from them." if window >= max_len(model) else ""))
    return out


def _summary(res: H.HeadAnalysis) -> list[str]:
    """Three to five findings for the summary, every number read from ``heads.csv``,
    ``heads_layers.csv`` or ``syntax_best.csv``: the label counts, the clearest positional
    head, the strongest induction (or its absence), the sink layer, the best syntactic head."""
    h = res.heads
    counts = h["label"].value_counts()
    out = [f"{len(h)} heads: " + ", ".join(f"{v} {k}" for k, v in counts.head(4).items())
           + (f", {int(counts.iloc[4:].sum())} other" if len(counts) > 4 else "") + "."]
    pos = h[h["label"].isin(["previous-token", "next-token", "positional"])
            & (h["positional_share"] >= res.info["thresholds"]["positional"])]
    if len(pos):  # the clearest head of each positional kind
        best = (pos.sort_values(["positional_share", "positional_n"], ascending=False)
                .drop_duplicates("label").head(2))
        out.append("; ".join(f"{_hl(r)} is a {r.label} head: its most-attended key is at offset "
                             f"{int(r.positional_offset):+d} for {r.positional_share:.0%} of "
                             f"{int(r.positional_n)} queries" for r in best.itertuples()) + ".")
    else:
        best = h["positional_share"].max()
        out.append(f"No positional head: no head puts its most-attended key at one offset for "
                   f"{res.info['thresholds']['positional']:.0%} of the queries"
                   + (f" (best {best:.0%})." if np.isfinite(best) else "."))
    ind = h.loc[h["induction"].idxmax()]
    n_ind = int((h["label"] == "induction").sum())
    if n_ind:
        out.append(f"{n_ind} induction head(s); the strongest, {_hl(ind)}, gives "
                   f"{ind['induction']:.2f} of its attention to the token after the earlier copy.")
    else:
        out.append(f"No induction head: the strongest prefix matching is {_hl(ind)} at "
                   f"{ind['induction']:.2f}.")
    lay = res.layers
    if "sink_first" in lay and len(lay):
        top = lay.loc[lay["sink_first"].idxmax()]
        out.append(f"First-token sink: layer {int(top['layer'])} gives it {top['sink_first']:.2f} "
                   f"of its attention on average ({int((h['label'] == 'sink').sum())} sink heads).")
    bs = res.best_syntax.dropna(subset=["accuracy"])
    if len(bs):
        r = bs.sort_values("margin", ascending=False).iloc[0]
        out.append(f"Syntax: best margin over a fixed offset is {r['relation']} ({r['direction']}) "
                   f"{_hl(r)} {r['accuracy']:.0%} vs {r['baseline_accuracy']:.0%} "
                   f"({int(r['n'])} pairs).")
    return out[:5]


# --------------------------------------------------------------------------- builders


def build(model: HookedTransformer, opts: dict, progress: Progress) -> Section:
    """The head-taxonomy section for ``model`` (see :mod:`analyses.heads`)."""
    from analyses.app import plots

    t0 = time.perf_counter()
    layer, head = opts.get("layer"), opts.get("head")
    check_focus(model, layer, head)
    kwargs, data = inputs(model, opts)
    res = H.analyze(model, **kwargs, n_random=int(opts.get("n_random") or DEFAULT_N_RANDOM),
                    half_len=opts.get("half_len"), batch_size=int(opts.get("batch_size") or 16),
                    max_tokens=int(opts.get("max_tokens") or DEFAULT_MAX_TOKENS),
                    seed=int(opts.get("seed") or 0), progress=progress)
    timings = {"analyze": time.perf_counter() - t0}
    info = res.info
    data += (f" Token-level scores: {info['n_sequences']} sequences, {info['n_tokens']} tokens "
             f"({info['source']})."
             + (f" Dependency pairs scored: {info['n_pairs']}." if "n_pairs" in info else "")
             + f" Induction scores: {info['n_random']} sequences of 2 x {info['random_half_len']} "
               f"distinct random tokens (seed {int(opts.get('seed') or 0)}).")
    figures: dict[str, Any] = {
        "heads_labels": plots.label_map(res.heads, title="Head taxonomy: label per head"),
        "heads_prev_token": heat(res.heads, "rand_prev_token",
                                 "Previous-token attention on random tokens"),
        "heads_induction": heat(res.heads, "induction",
                                "Prefix-matching (induction) attention on repeated random tokens"),
    }
    figures["heads_sinks"] = layer_lines(res.layers)
    tables = {"heads": res.heads, "heads_layers": res.layers}
    show = {"heads_layers": len(res.layers)}
    if len(res.syntax):
        tables["syntax"] = res.syntax
        tables["syntax_best"] = res.best_syntax
        show["syntax_best"] = len(res.best_syntax)
        if res.best_syntax["accuracy"].notna().any():
            figures["heads_syntax_best"] = syntax_bars(res.best_syntax)
    findings = _findings(res, model)
    files, _, line = explorer_files(model, res.heads, report_texts(opts),
                                    model_name=shown_path(str(opts.get("model_source")
                                                              or "model")))
    findings.append(line)
    if layer is not None:
        table, fig = focus(model, res, layer, head if head is not None else 0)
        tables["heads_focus"] = table
        show["heads_focus"] = len(table)
        figures["heads_focus"] = fig
    timings["total"] = time.perf_counter() - t0
    return Section(
        key="heads",
        title="Head taxonomy: what each attention head does",
        method=METHOD.format(**res.info["thresholds"]),
        source=SOURCE,
        data=data,
        findings=findings,
        tables=tables,
        figures=figures,
        show_tables=show,
        timings=timings,
        summary=_summary(res),
        summary_figure="heads_labels",
        files=files,
    )


def build_compare(models: dict[str, HookedTransformer], opts: dict, progress: Progress) -> Section:
    """Side-by-side taxonomy of several models on the same repeated random tokens
    (:func:`analyses.heads.compare`): a combined frame and one label map per model."""
    t0 = time.perf_counter()
    df = H.compare(models, n_random=int(opts.get("n_random") or DEFAULT_N_RANDOM),
                   half_len=opts.get("half_len"), batch_size=int(opts.get("batch_size") or 16),
                   seed=int(opts.get("seed") or 0), progress=progress)
    summary = []
    for name, g in df.groupby("model", sort=False):
        prev = g.loc[g["rand_prev_token"].idxmax()]
        ind = g.loc[g["induction"].idxmax()]
        mode = g.loc[g["mode_share"].idxmax()]
        summary.append({
            "model": name, "positional_encoding": g["positional_encoding"].iloc[0],
            "labels": ", ".join(f"{k} {v}" for k, v in g["label"].value_counts().items()),
            "best_prev_token_head": _hl(prev), "prev_token": prev["rand_prev_token"],
            "best_induction_head": _hl(ind), "induction": ind["induction"],
            "copying": ind["copying"],
            "first_token_share": g["rand_first"].mean(),
            "strongest_fixed_offset_head": _hl(mode), "fixed_offset": int(mode["mode_offset"]),
            "fixed_offset_share": mode["mode_share"],
        })
    summary_df = pd.DataFrame(summary)
    findings = [f"{r['model']} ({r['positional_encoding']}): previous-token "
                f"{r['best_prev_token_head']} ({r['prev_token']:.2f}), induction "
                f"{r['best_induction_head']} ({r['induction']:.2f}, copying {r['copying']:+.2f}); "
                f"most fixed head {r['strongest_fixed_offset_head']} (argmax at offset "
                f"{r['fixed_offset']:+d} for {r['fixed_offset_share']:.0%} of queries); labels: "
                f"{r['labels']}." for r in summary]
    return Section(
        key="heads_compare",
        title="Head taxonomies side by side",
        method=("Each model is analysed by the same procedure as the head-taxonomy section, on "
                "repeated random tokens drawn with the same seed (token-level scores come from the "
                "same sequences, since these models read no text). Labels and thresholds as "
                "above."),
        source=SOURCE,
        data=f"Models: {', '.join(f'`{k}`' for k in models)}; "
             f"{int(opts.get('n_random') or DEFAULT_N_RANDOM)} random sequences each.",
        findings=findings,
        tables={"heads_compare": df, "heads_compare_summary": summary_df},
        figures={"heads_compare_labels": compare_figure(df)},
        show_tables={"heads_compare_summary": len(summary_df)},
        timings={"total": time.perf_counter() - t0},
        summary=_compare_summary(summary_df),
        summary_figure="heads_compare_labels",
    )


def _compare_summary(summary: pd.DataFrame) -> list[str]:
    """One line per model (five at most), its numbers from ``heads_compare_summary.csv``."""
    out = [f"{r.model} ({r.positional_encoding}): strongest induction head "
           f"{r.best_induction_head} {r.induction:.2f}, previous-token {r.best_prev_token_head} "
           f"{r.prev_token:.2f}." for r in summary.head(5).itertuples()]
    if len(summary) > 5:
        out[-1] += f" ({len(summary) - 4} more models in the table.)"
    return out


def check_focus(model: HookedTransformer, layer: int | None, head: int | None) -> None:
    """Layer and head of ``--layer/--head`` must exist in the model."""
    n_l, n_h = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if head is not None and layer is None:
        raise InterpError("--head needs --layer.")
    if layer is not None and not 0 <= layer < n_l:
        raise InterpError(f"Layer {layer} is out of range: the model has {n_l} layers "
                          f"(0-{n_l - 1}).")
    if head is not None and not 0 <= head < n_h:
        raise InterpError(f"Head {head} is out of range: the model has {n_h} heads per layer "
                          f"(0-{n_h - 1}).")


def _applies(model: HookedTransformer) -> bool:
    """Decoder and encoder models with blocks (the taxonomy reads their attention patterns)."""
    architecture = getattr(model.cfg, "architecture", "decoder")
    return architecture in ("decoder", "encoder") and hasattr(model, "blocks")


register("heads", title="Head taxonomy", build=build, applies=_applies, order=20)


@cli.command("heads")
@model_argument()
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Text file to parse with spaCy and analyse [default: the "
                                 "packaged 40-sentence sample].")
@click.option("--conllu", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CoNLL-U file with gold dependency parses (e.g. UD English EWT dev).")
@click.option("--n-random", type=click.IntRange(min=1), default=DEFAULT_N_RANDOM,
              show_default=True, help="Repeated random-token sequences for the induction scores.")
@click.option("--half-len", type=click.IntRange(min=2), default=None,
              help="Tokens per copy in the random sequences [default: 32, cut to the context].")
@click.option("--layer", type=int, default=None,
              help="Also show this layer's head (with --head) in detail.")
@click.option("--head", type=int, default=None, help="Head to show in detail (needs --layer).")
@click.option("--compare", "compare", multiple=True, metavar="MODEL",
              help="Add a side-by-side section with these models (repeatable), e.g. "
                   "induction_rope.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def heads_cmd(ctx: click.Context, model: str, text_file: Path | None, conllu: Path | None,
              n_random: int, half_len: int | None, layer: int | None, head: int | None,
              compare: tuple[str, ...], svg: bool, out: Path | None, batch_size: int,
              max_tokens: int | None, device: str, dtype: str, seed: int, quiet: bool,
              force: bool) -> None:
    """Classify every attention head of MODEL: positional, previous-token, next-token,
    induction, duplicate-token, sink, syntactic:<relation>, semantic, local, long-range, uniform.

    Writes data/heads.csv (label, confidence, every score), data/syntax.csv (accuracy per
    relation, direction and head against the best fixed offset), a layer x head label map,
    and the best head per relation. MODEL may also name a packaged training checkpoint
    (induction, induction_rope, ...).

    \b
    Example:
      interp heads minilm --conllu tests/data/heads_sentences.conllu --out reports/heads_minilm
      interp heads smollm2-135m --text analyses/data/sample_text.txt --out reports/heads_smol
      interp heads induction_sinusoidal --compare induction_learned --compare induction_rope \\
          --compare induction_alibi --out reports/heads_positions
    """
    if text_file is not None and conllu is not None:
        raise click.UsageError("give --text or --conllu, not both")
    if head is not None and layer is None:
        raise click.BadParameter("--head needs --layer", param_hint="'--head'")
    if text_file is not None:
        check_text_file(text_file)
    if conllu is not None:
        if not conllu.is_file():
            raise CliError(f"CoNLL-U file not found: {conllu}")
        check_conllu_file(conllu)
    out = prepare_out(ctx, out, force)
    source = resolve_source(model)
    m = load_model(source, device, dtype, seed=seed)
    check_focus(m, layer, head)
    opts = {"model_source": model, "batch_size": batch_size, "max_tokens": max_tokens,
            "device": device, "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg,
            "text_file": text_file, "conllu": conllu, "n_random": n_random,
            "half_len": half_len, "layer": layer, "head": head}
    progress = progress_bar(quiet)
    sections = [build(m, opts, progress)]
    models: dict[str, Any] = {model: m}
    if compare:
        for other in compare:
            if other not in models:
                models[other] = load_model(resolve_source(other), device, dtype, seed=seed)
        shown = {(Path(k).stem if k.endswith((".pt", ".json", ".gguf")) or "/" in k else k): v
                 for k, v in models.items()}
        sections.append(build_compare(shown if len(shown) == len(models) else models, opts,
                                      progress))
    write_report(sections, out=out, force=force, model_source=", ".join(models),
                 model=m if len(models) == 1 else models, seed=seed, ctx=ctx, svg=svg,
                 quiet=quiet, title=f"interp heads: {', '.join(models)}")
