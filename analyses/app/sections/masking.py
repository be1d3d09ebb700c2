"""Report section and ``interp masking`` command: masking effects (see :mod:`analyses.masking`).

Thin by design: it tokenises the text, calls the analysis functions, turns their frames into
figures and findings, and hands everything to the report writer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses import masking
from analyses.app.cli import (
    CliError,
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    write_report,
)
from analyses.app.report import Section
from analyses.app.sections import register
from analyses.app.sections._summaries import masking_summary
from analyses.masking.learned import learned_mask_tables
from interp.progress import Progress, progress_bar

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["build", "masking_cmd"]

DEFAULT_SEQ_LEN = 64
DEFAULT_MAX_TOKENS = 512  # 8 sequences of 64 tokens: enough for stable means, fast on a CPU

SOURCE = (
    "Michel, Levy and Neubig (2019), *Are Sixteen Heads Really Better than One?*, NeurIPS "
    "(head gates, importance E_x |dL(x)/dxi_h|, per-layer normalisation, pruning curves); "
    "Child, Gray, Radford and Sutskever (2019), *Generating Long Sequences with Sparse "
    "Transformers*, arXiv:1904.10509 (strided and block-local patterns); Beltagy, Peters and "
    "Cohan (2020), *Longformer*, arXiv:2004.05150 (sliding windows); Raffel et al. (2020), "
    "*Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer*, JMLR, "
    "sec. 3.2.1 (prefix-LM mask); Devlin et al. (2019), *BERT*, NAACL (15% token masking); "
    "Lin (1991), *Divergence measures based on the Shannon entropy*, IEEE Trans. Inf. Theory "
    "(Jensen-Shannon divergence); Fedus, Zoph and Shazeer (2022), *Switch Transformers*, JMLR "
    "(mixture of experts)."
)


def _fmt(x: float) -> str:
    """A number to 3 significant digits, ``n/a`` when missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3g}"


def _head_matrix(df: pd.DataFrame, value: str, unit: str = "head") -> pd.DataFrame:
    """One column of a per-head (or per-expert) frame as a layer x unit matrix for heatmaps."""
    m = df.pivot(index="layer", columns=unit, values=value).sort_index()
    m.index.name, m.columns.name = "layer", unit
    return m


def _strategy_findings(table: pd.DataFrame, heads: pd.DataFrame, model: HookedTransformer,
                       has_head: bool) -> list[str]:
    """Findings on the strategies: the opposite mask, the soft-mask sweep, the largest change
    and what temperature does to attention entropy."""
    out = []
    metric = "kl" if has_head else "hidden_cos_delta"
    what = "output KL" if has_head else "hidden-state cosine change (no LM head, so no KL or loss)"
    rows = table[table["strategy"] != "baseline"].set_index("label")
    base_is_full = model.cfg.mask.is_full
    opposite = "causal" if base_is_full else "bidirectional"
    if opposite in rows.index:
        r = rows.loc[opposite]
        h = heads[heads["label"] == opposite].sort_values("js", ascending=False).head(5)
        top = ", ".join(f"L{int(x.layer)}H{int(x.head)} ({x.js:.2f} bits)" for x in h.itertuples())
        if base_is_full:
            out.append(f"Causal mask on this bidirectional model: {what} {_fmt(r[metric])}, mean "
                       f"JS {_fmt(r['mean_js'])} bits. Heads that depend most on seeing the right "
                       "side of the sentence (largest JS between causal and bidirectional "
                       f"patterns): {top}.")
        else:
            out.append(f"Bidirectional attention on this causal model ({what} {_fmt(r[metric])}, "
                       f"loss change {_fmt(r['loss_delta'])}): the heads whose patterns move most "
                       f"when the future becomes visible: {top}.")
    soft = table[table["strategy"] == "soft"].sort_values("parameter")
    col = "kl_to_hard" if has_head else "hidden_cos_delta_to_hard"
    if len(soft) >= 2:
        vals = soft[col].to_numpy(float)
        mono = bool(np.all(np.diff(vals) <= 1e-12 + 1e-9 * np.abs(vals[:-1])))
        first, last = soft.iloc[0], soft.iloc[-1]
        target = str(soft["mask"].iloc[0]).split(";")[0].removeprefix("mask ")
        out.append(f"Soft {target} mask: its {'KL' if has_head else 'cosine change'} to the hard "
                   f"mask {'falls monotonically' if mono else 'does NOT fall monotonically'} as "
                   f"the penalty grows, from {_fmt(first[col])} at penalty {first['parameter']:g} "
                   f"to {_fmt(last[col])} at penalty {last['parameter']:g} (penalty 0 = nothing "
                   "hidden).")
    if len(rows):
        big = rows[metric].astype(float).idxmax()
        out.append(f"Largest change: {big} ({what} {_fmt(rows.loc[big, metric])}, mean JS "
                   f"{_fmt(rows.loc[big, 'mean_js'])} bits, entropy change "
                   f"{_fmt(rows.loc[big, 'entropy_delta'])} nats, distance change "
                   f"{_fmt(rows.loc[big, 'distance_delta'])} positions).")
    temp = rows[rows["strategy"] == "temperature"]
    if len(temp):
        pairs = zip(temp["parameter"], temp["entropy_delta"], strict=True)
        parts = ", ".join(f"T={p:g}: {_fmt(e)}" for p, e in pairs)
        out.append(f"Attention temperature moves the mean attention entropy (nats) by {parts}.")
    return out


def _head_findings(imp: pd.DataFrame, curve: pd.DataFrame, corr: dict[str, float], n_ok: int,
                   unit: str, n_units: int) -> list[str]:
    """Findings on head (or expert) masking: importance against ablation, how many units can
    go before the loss rises 5%, importance order against random orders, the worst removals."""
    out = []
    r = corr.get("importance~ablation_delta", float("nan"))
    out.append(
        f"Spearman correlation of {unit} importance E_x|dL/dxi| with the single-{unit} "
        f"zero-ablation loss change: {_fmt(r)}; signed estimate -E dL/dxi: "
        f"{_fmt(corr.get('predicted_delta~ablation_delta', float('nan')))}; |E dL/dxi| (absolute "
        f"of the batch mean): {_fmt(corr.get('abs_mean_gradient~ablation_delta', float('nan')))}."
        + (" Against mean ablation: "
           f"{_fmt(corr.get('importance~mean_ablation_delta', float('nan')))}."
           if "importance~mean_ablation_delta" in corr else ""))
    cap = int(curve["n_effective"].max()) if "n_effective" in curve else n_units
    limit = f" (at most {cap} can go: each layer keeps top_k)" if cap < n_units else ""
    out.append(f"{n_ok} of {n_units} {unit}s ({n_ok / max(n_units, 1):.0%}) can be removed, least "
               f"important first, before the loss rises by more than 5%{limit}.")
    imp_c = curve[curve["order"] == "importance"].set_index("n_removed")["loss"]
    rnd = curve[curve["order"] == "random"].groupby("n_removed")["loss"].mean()
    inner = [k for k in imp_c.index if 0 < k < n_units and k in rnd.index]
    if inner and len(rnd):
        below = sum(imp_c[k] <= rnd[k] for k in inner)
        area_i = float(np.mean([imp_c[k] for k in inner]))
        area_r = float(np.mean([rnd[k] for k in inner]))
        out.append("Pruning in importance order stays at or below the mean random-order curve at "
                   f"{below} of {len(inner)} intermediate points (mean loss {area_i:.3f} vs "
                   f"{area_r:.3f}).")
    top = imp.sort_values("ablation_delta", ascending=False).head(3)
    out.append(f"{unit.capitalize()}s whose removal hurts most: " + ", ".join(
        f"L{int(x.layer)}{unit[0].upper()}{int(getattr(x, unit))} "
        f"(+{x.ablation_delta:.3f})" for x in top.itertuples()) + ".")
    return out


def _task_batches(model: HookedTransformer, max_tokens: int, batch_size: int,
                  seed: int) -> list | None:
    """Token batches sampled from the task a model from ``interp train`` learnt (its word
    vocabulary cannot read English), or None for any other model."""
    task = (getattr(model.cfg, "extra", None) or {}).get("task")
    if not isinstance(task, dict):
        return None
    try:
        import torch

        from interp.train import task_from
    except ImportError:
        return None
    t = task_from(model)
    gen = torch.Generator().manual_seed(seed)
    seq = int(t.sample(1, gen).tokens.shape[1])
    n = max(1, max_tokens // seq)
    tokens = t.sample(n, torch.Generator().manual_seed(seed)).tokens.to(model.device)
    return [tokens[i:i + batch_size] for i in range(0, n, batch_size)]


SAMPLE_WHAT = ("the packaged sample (analyses/data/sample_text.txt, 40 English sentences "
               "written for this project)")

METHOD = (
    "Same weights, run-time overrides only (`model.override_attention`, `model.set_head_gates`, "
    "`model.set_expert_mask`). **Strategies**: the model's own mask (baseline) against the "
    "opposite mask, sliding windows, a prefix-LM mask, block-local and strided sparse patterns "
    "(intersected with the model's own mask), soft masks (a finite penalty P on the scores of "
    "hidden keys instead of -inf; for a causal model the soft causal mask lets the future leak, "
    "for an encoder it softens a causal mask, so P = 0 is the encoder's own attention), attention "
    "temperatures and BERT-style token masking. Per strategy: KL(P_baseline || P_strategy) of the "
    "output distributions averaged over positions, loss change (next-token cross-entropy for "
    "decoders), 1 - cosine of the last layer's hidden states, and per head the Jensen-Shannon "
    "divergence (bits) between baseline and strategy attention rows averaged over queries, the "
    "change of attention entropy (nats) and of mean attention distance |q - k|. All sums stream "
    "over batches. **Head masking**: gates xi_h = 1 on every head's output; importance I_h = E_x "
    "|dL(x)/dxi_h| with the absolute value inside the mean, per sequence (Michel et al. eq. 2); "
    "the signed first-order estimate -E_x dL/dxi_h (predicted loss change on removal) and |E_x "
    "dL/dxi_h| (absolute of the mean, a weaker quantity: opposite signs cancel) are reported "
    "beside it. Single-head zero ablation (gate 0) and mean ablation (output replaced by its "
    "corpus mean); pruning curves remove heads least-important first and in random orders; the "
    "5% count is exact (one head at a time inside the bracketing step)."
)
EXPERT_METHOD = (
    " **Expert masking**: the same with a gate on each expert's routed weight for importance and "
    "`set_expert_mask` (the router renormalises over the rest) for ablation and pruning."
)
NO_LM_HEAD_NOTE = (
    "This model has no LM head: there is no output distribution, so KL and loss are not defined; "
    "the output change is 1 - cosine similarity of the last layer's hidden states, and head "
    "masking (which needs a loss to differentiate) is skipped."
)


def build(model: HookedTransformer, opts: dict, progress: Progress) -> Section:
    """The masking-effects section for ``model`` (see :mod:`analyses.masking`): strategies
    always; head masking, and expert masking for MoE models, when the model has an LM head."""
    t_all = time.perf_counter()
    seed = int(opts.get("seed") or 0)
    batches, text_name = _batches(model, opts, seed)
    n_seqs = sum(int(b.shape[0]) for b in batches)
    T = int(batches[0].shape[1])
    strategies = masking.parse_strategies(opts.get("strategies"), model.cfg.mask, T)
    has_head = bool(model.cfg.has_unembed)
    part = _Part()
    head_note = None
    _strategies_part(part, model, batches, strategies, seed, progress)
    notes = []
    if not has_head:
        notes.append(NO_LM_HEAD_NOTE)
    if any(s.token_mask_rate is not None for s in strategies):
        notes.append(f"Token masking writes the {masking.replacement_token(model)[1]}; special "
                     "tokens are never replaced.")
    if not has_head:
        head_note = "Head masking not run: the model has no LM head, so there is no loss."
    elif opts.get("no_heads"):
        head_note = "Head masking not run (--no-heads)."
    if has_head and not opts.get("no_heads"):
        lbs = masking.loss_batches(model, batches, seed=seed)
        _heads_part(part, model, lbs, opts, seed, progress)
        if model.cfg.n_experts:
            _experts_part(part, model, lbs, opts, seed, progress)
    part.timings["total"] = time.perf_counter() - t_all
    method = (METHOD + (EXPERT_METHOD if model.cfg.n_experts else "")
              + (" " + " ".join(notes) if notes else ""))
    data = (f"{n_seqs} sequences of {T} tokens ({n_seqs * T} tokens) cut from {text_name}. "
            f"Strategies: {', '.join(s.label for s in strategies)}.")
    shown = {"mask_strategies": 40,
             **({"head_importance": 15} if "head_importance" in part.tables else {})}
    return Section(
        key="masking",
        title="Masking effects: attention masks, token masks, head and expert masking",
        method=method,
        source=SOURCE,
        data=data,
        findings=part.findings,
        tables=part.tables,
        figures=part.figures,
        show_tables=shown,
        timings=part.timings,
        summary=masking_summary(part.tables, part.removable, has_head, head_note),
        summary_figure=next((f for f in ("masking_strategies", "masking_pruning_curves")
                             if f in part.figures), None),
    )


@dataclass
class _Part:
    """What the parts of :func:`build` add to the section, in the order they run."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    removable: dict[str, int] = field(default_factory=dict)  # unit -> removable within 5%


def _batches(model: HookedTransformer, opts: dict, seed: int) -> tuple[list, str]:
    """The token batches every measurement runs on, and where they came from in words:
    the ``--text`` file, the model's own training task, or the packaged sample."""
    text = opts.get("text")
    text_name = opts.get("text_name") or SAMPLE_WHAT
    seq_len = int(opts.get("seq_len") or DEFAULT_SEQ_LEN)
    max_tokens = int(opts.get("max_tokens") or DEFAULT_MAX_TOKENS)
    batch_size = int(opts.get("batch_size") or 8)
    batches = _task_batches(model, max_tokens, batch_size, seed) if text is None else None
    if batches is not None:
        task = model.cfg.extra["task"]["name"]
        return batches, f"the model's own training task `{task}` (fresh samples, seed {seed})"
    batches = masking.text_to_batches(
        model, text if text is not None else masking.load_sample_text(), seq_len=seq_len,
        n_seqs=max(1, max_tokens // seq_len), batch_size=batch_size)
    return batches, text_name


def _strategies_part(part: _Part, model: HookedTransformer, batches: list,
                     strategies: list, seed: int, progress: Progress) -> None:
    """Every mask strategy against the baseline: tables, findings and three figures."""
    from analyses.app import plots

    has_head = bool(model.cfg.has_unembed)
    t0 = time.perf_counter()
    table, heads = masking.compare_strategies(model, batches, strategies, seed=seed,
                                              progress=progress)
    part.timings["strategies"] = time.perf_counter() - t0
    part.tables.update({"mask_strategies": table, "mask_strategy_heads": heads})
    part.findings += _strategy_findings(table, heads, model, has_head)
    metric = "kl" if has_head else "hidden_cos_delta"
    shown = table[table["strategy"] != "baseline"]
    if len(shown):
        what = "KL to baseline, nats" if has_head else "1 - cosine of final hidden state"
        fig = plots.bars(shown, "label", metric, title=f"Output change per strategy ({what})",
                         xlabel="strategy", ylabel=metric)
        if (shown[metric] > 0).any():
            fig.axes[0].set_yscale("log")
        part.figures["masking_strategies"] = fig
    soft = table[table["strategy"] == "soft"]
    if len(soft) >= 2:
        part.figures["masking_soft_sweep"] = _soft_sweep_figure(soft, model, metric, has_head)
    opposite = "causal" if model.cfg.mask.is_full else "bidirectional"
    if (heads["label"] == opposite).any():
        part.figures[f"masking_js_{opposite}"] = plots.heatmap(
            _head_matrix(heads[heads["label"] == opposite], "js"),
            title=f"JS divergence (bits) of each head's pattern: {opposite} vs the model's own "
                  "mask", cmap="magma")


def _soft_sweep_figure(soft: pd.DataFrame, model: HookedTransformer, metric: str,
                       has_head: bool) -> Figure:
    """The soft-mask sweep: distance to the hard mask (and, for an encoder, to the baseline)."""
    from analyses.app import plots

    col = "kl_to_hard" if has_head else "hidden_cos_delta_to_hard"
    if model.cfg.mask.is_full:  # an encoder: the soft causal mask moves away from the baseline
        long = pd.concat([soft.assign(reference="hard causal mask", value=soft[col]),
                          soft.assign(reference="baseline (bidirectional)", value=soft[metric])])
    else:  # the hard mask is the baseline
        long = soft.assign(reference="hard mask = baseline", value=soft[col])
    fig = plots.lines(long, "parameter", "value", hue="reference",
                      title="Soft mask: distance to the hard mask and to the baseline",
                      xlabel="penalty on masked scores",
                      ylabel="KL (nats)" if has_head else "1 - cosine")
    if (long["value"] > 0).all():
        fig.axes[0].set_yscale("log")
    return fig


def _heads_part(part: _Part, model: HookedTransformer, lbs: list, opts: dict, seed: int,
                progress: Progress) -> None:
    """Head masking: importance, single-head ablation, pruning curves (Michel et al. 2019)."""
    from analyses.app import plots

    t0 = time.perf_counter()
    imp = masking.head_importance(model, lbs, normalize=bool(opts.get("normalize")),
                                  progress=progress)
    part.timings["head_importance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    abl = masking.head_ablation(model, lbs, progress=progress)
    part.timings["head_ablation"] = time.perf_counter() - t0
    merged = imp.merge(abl, on=["layer", "head"])
    lead = ["layer", "head", "importance", "ablation_delta", "predicted_delta",
            "mean_ablation_delta"]
    merged = merged[lead + [c for c in merged.columns if c not in lead]]
    t0 = time.perf_counter()
    curve = masking.head_pruning_curves(model, lbs, imp, steps=int(opts.get("pruning_steps") or 20),
                                        n_random=int(opts.get("random_orders", 3)), seed=seed,
                                        progress=progress)
    n_ok = masking.max_removable(model, lbs, imp, curve)
    part.removable["head"] = n_ok
    part.timings["head_pruning"] = time.perf_counter() - t0
    corr = masking.importance_correlations(merged)
    part.findings += _head_findings(merged, curve, corr, n_ok, "head", len(merged))
    part.tables["head_importance"] = merged
    learned, lines = learned_mask_tables(model, imp)  # adaptive spans, L0 gates (if any)
    part.tables.update(learned)
    part.findings += lines
    part.tables["pruning_curve"] = curve
    part.figures["masking_head_importance"] = plots.heatmap(
        _head_matrix(merged, "importance"),
        title="Head importance E_x |dL(x)/dxi_h| (Michel et al. 2019)")
    part.figures["masking_head_ablation"] = plots.heatmap(
        _head_matrix(merged, "ablation_delta"), cmap="RdBu_r", center=0,
        title="Loss change when the head alone is removed (zero ablation)")
    part.figures["masking_pruning_curves"] = plots.lines(
        curve, "fraction", "loss", hue="order",
        title="Loss as heads are removed (random: mean and 95% interval)",
        xlabel="fraction of heads removed", ylabel="loss (nats/token)")


def _experts_part(part: _Part, model: HookedTransformer, lbs: list, opts: dict, seed: int,
                  progress: Progress) -> None:
    """Expert masking for MoE models: the same measurements with one gate per expert."""
    from analyses.app import plots

    t0 = time.perf_counter()
    eimp = masking.expert_importance(model, lbs, normalize=bool(opts.get("normalize")),
                                     progress=progress)
    eabl = masking.expert_ablation(model, lbs, progress=progress)
    emerged = eimp.merge(eabl, on=["layer", "expert"])
    ecurve = masking.expert_pruning_curves(model, lbs, eimp, steps=min(20, len(eimp)),
                                           n_random=int(opts.get("random_orders", 3)), seed=seed,
                                           progress=progress)
    e_ok = masking.max_removable(model, lbs, eimp, ecurve, unit="expert")
    part.removable["expert"] = e_ok
    part.timings["experts"] = time.perf_counter() - t0
    part.findings += _head_findings(emerged, ecurve, masking.importance_correlations(emerged),
                                    e_ok, "expert", len(emerged))
    part.tables["expert_importance"] = emerged
    part.tables["expert_pruning_curve"] = ecurve
    part.figures["masking_expert_importance"] = plots.heatmap(
        _head_matrix(emerged, "importance", "expert"), title="Expert importance E_x |dL(x)/dxi_e|")
    part.figures["masking_expert_pruning"] = plots.lines(
        ecurve, "fraction", "loss", hue="order", title="Loss as experts are masked out",
        xlabel="fraction of experts removed", ylabel="loss (nats/token)")


register("masking", title="Masking effects", build=build, order=50)


@cli.command("masking")
@model_argument()
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file to run [default: the packaged 40-sentence English sample].")
@click.option("--strategy", "strategies", multiple=True, metavar="NAME[:P]",
              help="Strategy to run, repeatable; a bare name sweeps its defaults [default: all]. "
                   f"One of: {', '.join(masking.STRATEGY_NAMES)}.")
@click.option("--seq-len", type=click.IntRange(min=2), default=DEFAULT_SEQ_LEN, show_default=True,
              help="Tokens per sequence.")
@click.option("--no-heads", is_flag=True, help="Skip head and expert masking (strategies only).")
@click.option("--normalize", is_flag=True,
              help="L2-normalise head importance within each layer (Michel et al. 2019).")
@click.option("--pruning-steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Points on each pruning curve.")
@click.option("--random-orders", type=click.IntRange(min=0), default=3, show_default=True,
              help="Random pruning orders to average.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def masking_cmd(ctx: click.Context, model: str, text_file: Path | None,
                strategies: tuple[str, ...], seq_len: int, no_heads: bool, normalize: bool,
                pruning_steps: int, random_orders: int, svg: bool, out: Path | None,
                batch_size: int, max_tokens: int | None, device: str, dtype: str, seed: int,
                quiet: bool, force: bool) -> None:
    """Masking effects of MODEL: attention masks, soft masks, temperatures, token masking,
    head importance and pruning (Michel et al. 2019), expert masking for MoE models.

    Writes data/mask_strategies.csv, data/head_importance.csv, data/pruning_curve.csv and
    figures. STRATEGY is NAME or NAME:P, e.g. sliding_window:4, soft:8, temperature:0.5,
    token_mask:0.15, bidirectional, causal, prefix_lm:16, block_sparse:8, strided:8.

    \b
    Example:
      interp masking minilm --out reports/masking_minilm
      interp masking smollm2-135m --strategy bidirectional --strategy sliding_window:16 \\
          --no-heads --max-tokens 512 --out reports/masking_smol
      interp masking interp/data/induction.pt --strategy soft --strategy sliding_window:4 \\
          --out reports/masking_induction
    """
    from analyses.masking import parse_strategies
    from interp.masks import causal

    # names and parameters fail before any slow work
    parse_strategies(list(strategies), causal(), seq_len)
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CliError(f"text file not found: {text_file}") from None
        except UnicodeDecodeError:
            raise CliError(f"text file {text_file} is not UTF-8 text") from None
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    opts = {"model_source": model, "batch_size": batch_size, "max_tokens": max_tokens,
            "device": device, "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg,
            "text": text, "text_name": f"`{text_file.name}`" if text_file else None,
            "strategies": list(strategies) or None, "seq_len": seq_len, "no_heads": no_heads,
            "normalize": normalize, "pruning_steps": pruning_steps,
            "random_orders": random_orders}
    section = build(m, opts, progress_bar(quiet))
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed, ctx=ctx,
                 svg=svg, quiet=quiet, title=f"interp masking: {model}")
