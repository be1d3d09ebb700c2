"""``interp study norm`` and ``interp study masking``: the training studies as reports.

Each command trains its grid of small models (:mod:`analyses.studies`), turns the tables into
one report section with its figure, and writes the report folder. ``--seeds``, ``--steps`` and
(for norm) ``--depths`` shrink the grid, so a test runs a tiny version of the same code; the
shipped reports in ``reports/study-norm`` and ``reports/study-masking`` use the defaults.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses.app import plots
from analyses.app.cli import CliError, cli, prepare_out, write_report
from analyses.app.report import Section
from interp.errors import InterpError
from interp.progress import progress_bar

NORM_METHOD = """\
One decoder (d_model 64, 4 heads, d_mlp 256, learned positions, LayerNorm, GELU, weights
N(0, 1/d_model) as in Xavier-scale init) is built at each depth as **pre-LN**
(x + F(LN(x)), final LayerNorm) and **post-LN** (LN(x + F(x)), no final norm). Trained with
plain Adam (betas 0.9, 0.98), no gradient clipping, on next-token prediction over windows of 32
tokens, either at the full learning rate from step 1 (warm-up 0) or after a linear
warm-up. **Gradient norm per layer at initialisation**: the norm of the gradient of the loss
with respect to each block's parameters (and to its FFN output matrix, Xiong et al.'s
W^{2,L}), mean over 4 batches, before any step. **Failed**: final loss (mean of the last 10% of
steps) above the midpoint of the corpus' entropy rate and unigram entropy (less than half of
what context can give was learned; stuck runs sit just below the unigram entropy), or a
non-finite loss. **Spikes**: steps whose loss exceeds 1.25x the median of the 20 before."""
NORM_SOURCE = """\
Xiong et al. 2020, *On Layer Normalization in the Transformer Architecture* (ICML): post-LN
needs warm-up; at initialisation its gradients near the output are large, pre-LN's are well
behaved and it trains without warm-up. Vaswani et al. 2017 (post-LN); Liu et al. 2020,
*Understanding the Difficulty of Training Transformers* (post-LN's amplified dependence on the
residual branches)."""
CORPUS = """\
A synthetic first-order Markov language (`analyses/studies/data.py`, `MarkovCorpus`: 32
tokens, 3 successors each with Dirichlet(1) probabilities, chain seed 0): entropy rate and
unigram entropy are computed exactly (table `*_floors`/`*_ceilings`). Generated here; no
licence applies."""
MASK_METHOD = """\
The same decoder (2 layers, d_model 64, 4 heads, learned positions, pre-LN) is trained under
each strategy with the same seeds, data and Adam steps (linear warm-up, no clipping); only the
mask and the objective change (table `masking_strategies`). Afterwards every model answers the
same held-out questions: **next token** (the window cut before its last token; masked-LM gets
a `[MASK]` appended) and **cloze** (the middle token: masked-LM sees `[MASK]` there and both
sides; left-to-right models answer from the left context, the window cut at the blank). No
input contains its answer, so soft masks cannot leak it at evaluation. Ceilings: the chain's
Bayes accuracies. Stability: loss spikes (1.25x the median of the 20 steps before) and the
gradient norm per step. Training losses are each strategy's own objective: compare accuracies
across strategies."""
MASK_SOURCE = """\
Radford et al. 2018 (causal LM); Devlin et al. 2019, *BERT* (masked LM, 15%, 80/10/10); Raffel
et al. 2020, *T5* (prefix LM); Sukhbaatar et al. 2019, *Adaptive Attention Span*; Leviathan et
al. 2024, *Selective Attention*."""


def int_list(option: str, text: str, minimum: int = 0) -> list[int]:
    """``"2,6,12"`` -> [2, 6, 12]; one CliError line for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{option} {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not values or any(v < minimum for v in values):
        raise CliError(f"{option} {text!r} needs integers >= {minimum}, e.g. 0,1,2")
    return sorted(set(values))


def _norm_figure(grads: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """Gradient norm per layer at init (pre | post, one line per depth) and failure rate."""
    fig = plots.new_figure(13.0, 4.0)
    axes = fig.subplots(1, 3)
    top = max(float(grads["grad_block"].max()), 1e-9) * 1.1
    for ax, norm in zip(axes[:2], ("pre", "post"), strict=True):
        for depth, d in grads[grads.norm == norm].groupby("depth"):
            m = d.groupby("layer")["grad_block"].mean()
            ax.plot(m.index / max(depth - 1, 1), m.to_numpy(), marker="o", ms=3,
                    label=f"depth {depth}")
        ax.set_ylim(0, top)
        ax.set_title(f"{norm}-LN: gradient norm per block at init")
        ax.set_xlabel("layer / (depth - 1)  (0 = input, 1 = output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("|dL/d block parameters|")
    ax = axes[2]
    for (norm, warmup), d in summary.groupby(["norm", "warmup"]):
        ax.plot(d["depth"].astype(str), d["failure_rate"], marker="o",
                label=f"{norm}-LN, warm-up {warmup}")
    ax.set_title("Failed runs (loss > (unigram + floor) / 2)")
    ax.set_xlabel("depth")
    ax.set_ylabel("failure rate")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _norm_findings(summary: pd.DataFrame, grads: pd.DataFrame, floors: pd.DataFrame,
                   warmups: list[int]) -> list[str]:
    def rate(norm: str, warm: bool) -> str:
        d = summary[(summary.norm == norm) & ((summary.warmup > 0) == warm)]
        parts = [f"depth {r.depth}: {r.failure_rate:.0%}" for r in d.itertuples()]
        return ", ".join(parts) or "not run"

    deep = int(grads["depth"].max())
    g = grads[grads.depth == deep].groupby(["norm", "layer"])["grad_block"].mean()
    out = [f"Failure rate without warm-up: post-LN {rate('post', False)}; pre-LN "
           f"{rate('pre', False)}."]
    if any(w > 0 for w in warmups):
        out.append(f"With warm-up ({max(warmups)} steps): post-LN {rate('post', True)}; "
                   f"pre-LN {rate('pre', True)}.")
    for norm in ("pre", "post"):
        if norm in g.index.get_level_values(0):
            s = g[norm]
            out.append(f"{norm}-LN at depth {deep}, gradient norm at init: first block "
                       f"{s.iloc[0]:.2f}, last block {s.iloc[-1]:.2f} (last/first "
                       f"{s.iloc[-1] / s.iloc[0]:.2f}).")
    ok = summary[summary.failure_rate < 1]
    if len(ok):
        best = ok.sort_values("final_loss").iloc[0]
        out.append(f"Lowest mean final loss {best.final_loss:.3f} nats ({best.norm}-LN, depth "
                   f"{best.depth}, warm-up {best.warmup}); entropy rate "
                   f"{floors.entropy_rate.iloc[0]:.3f}, unigram "
                   f"{floors.unigram_entropy.iloc[0]:.3f}.")
    return out


def build_norm(opts: dict) -> Section:
    """Run the norm study with ``opts`` and make its section."""
    from analyses.studies.norm import norm_study, summarise_norm_runs

    t0 = time.perf_counter()
    tables = norm_study(opts["depths"], opts["seeds"], opts["steps"], opts["warmups"],
                        lr=opts["lr"], batch_size=opts["batch_size"], seq_len=32,
                        progress=opts["progress"])
    summary = summarise_norm_runs(tables["norm_runs"], tables["norm_init_grads"])
    tables["norm_summary"] = summary
    findings = _norm_findings(summary, tables["norm_init_grads"], tables["norm_floors"],
                              opts["warmups"])
    return Section(
        key="study_norm", title="Pre- vs post-norm: depth, warm-up, gradients at init",
        method=NORM_METHOD + f" Peak learning rate {opts['lr']:g}, {opts['steps']} steps of "
                             f"{opts['batch_size']} windows.",
        source=NORM_SOURCE, data=CORPUS, findings=findings, tables=tables,
        figures={"study_norm": _norm_figure(tables["norm_init_grads"], summary)},
        show_tables={"norm_summary": 40}, timings={"study": time.perf_counter() - t0},
        summary=findings, summary_figure="study_norm")


def _masking_figure(runs: pd.DataFrame, history: pd.DataFrame, ceilings: pd.DataFrame) -> Figure:
    """Next-token vs cloze accuracy per strategy (ceilings dashed) and the loss curves."""
    fig = plots.new_figure(12.0, 4.0)
    ax, ax2 = fig.subplots(1, 2)
    m = runs.groupby("strategy", sort=False)[["next_token_accuracy", "cloze_accuracy"]].mean()
    x = np.arange(len(m))
    ax.bar(x - 0.2, m["next_token_accuracy"], 0.4, label="next token")
    ax.bar(x + 0.2, m["cloze_accuracy"], 0.4, label="cloze (middle token)")
    ax.axhline(ceilings.bayes_next_token_accuracy.iloc[0], ls="--", c="C0", lw=1)
    ax.axhline(ceilings.bayes_cloze_accuracy.iloc[0], ls="--", c="C1", lw=1)
    ax.set_xticks(x, list(m.index))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (held out; dashed: Bayes ceiling)")
    ax.set_title("What each training mask can do afterwards")
    ax.legend(fontsize=7)
    for strategy, d in history.groupby("strategy", sort=False):
        curve = d.groupby("step")["loss"].mean().rolling(10, min_periods=1).mean()
        ax2.plot(curve.index, curve.to_numpy(), label=strategy)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (own objective, mean over seeds)")
    ax2.set_title("Training loss")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    return fig


def _masking_findings(runs: pd.DataFrame, ceilings: pd.DataFrame) -> list[str]:
    m = runs.groupby("strategy", sort=False).agg(
        nxt=("next_token_accuracy", "mean"), cloze=("cloze_accuracy", "mean"),
        spikes=("spikes", "mean"), gmax=("max_grad_norm", "mean"))
    parts = [f"{s} {r.nxt:.3f}/{r.cloze:.3f}" for s, r in m.iterrows()]
    out = [f"Next-token / cloze accuracy (mean over {runs.seed.nunique()} seeds): "
           + "; ".join(parts) + f". Bayes ceilings {ceilings.bayes_next_token_accuracy.iloc[0]:.3f}"
           f" / {ceilings.bayes_cloze_accuracy.iloc[0]:.3f}."]
    out.append(f"Best next-token: {m.nxt.idxmax()} ({m.nxt.max():.3f}); best cloze: "
               f"{m.cloze.idxmax()} ({m.cloze.max():.3f}).")
    out.append("Stability: mean loss spikes per run " + ", ".join(
        f"{s} {r.spikes:.1f}" for s, r in m.iterrows()) + "; mean of the largest gradient "
        "norm " + ", ".join(f"{s} {r.gmax:.2f}" for s, r in m.iterrows()) + ".")
    return out


def build_masking(opts: dict) -> Section:
    """Run the masking-strategies study with ``opts`` and make its section."""
    from analyses.studies.masking import STRATEGIES, masking_study

    t0 = time.perf_counter()
    tables = masking_study(opts["strategies"], opts["seeds"], opts["steps"], lr=opts["lr"],
                           batch_size=opts["batch_size"], progress=opts["progress"])
    tables["masking_strategies"] = pd.DataFrame(
        [{"strategy": k, "description": v} for k, v in STRATEGIES.items()
         if k in opts["strategies"]])
    findings = _masking_findings(tables["masking_runs"], tables["masking_ceilings"])
    return Section(
        key="study_masking", title="Masking strategies in training",
        method=MASK_METHOD + f" Peak learning rate {opts['lr']:g}, {opts['steps']} steps of "
                             f"{opts['batch_size']} windows of 32 tokens.",
        source=MASK_SOURCE, data=CORPUS, findings=findings, tables=tables,
        figures={"study_masking": _masking_figure(tables["masking_runs"],
                                                  tables["masking_history"],
                                                  tables["masking_ceilings"])},
        show_tables={"masking_strategies": 10, "masking_runs": 40},
        timings={"study": time.perf_counter() - t0}, summary=findings,
        summary_figure="study_masking")


@cli.group("study")
def study_group() -> None:
    """Training studies: small models trained under controlled variations, as reports.

    \b
    Example:
      interp study norm --depths 2 --seeds 0 --steps 10 --out reports/study-norm-tiny
    """


def _shared(func):  # noqa: ANN001, ANN202 - a click decorator stack
    for option in reversed([
        click.option("--seeds", default="0,1", show_default=True,
                     help="Comma-separated seeds (initial weights and data order)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Report folder [default: reports/<study>]."),
        click.option("--svg", is_flag=True, help="Also write SVG figures."),
        click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                     help="torch threads (0 = torch's default)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
        click.option("--force", is_flag=True, help="Replace an existing --out folder."),
    ]):
        func = option(func)
    return func


def _write(ctx: click.Context, section: Section, opts: dict, out: Path, force: bool,
           svg: bool, quiet: bool, title: str) -> None:
    extra = {"study": {k: v for k, v in opts.items() if k != "progress"}}
    write_report([section], out=out, force=force, model_source="synthetic Markov corpus",
                 model={}, seed=opts["seeds"][0], ctx=ctx, svg=svg, quiet=quiet, title=title,
                 extra=extra)


@study_group.command("norm")
@click.option("--depths", default="2,6,12,24", show_default=True,
              help="Comma-separated numbers of layers.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Adam steps per run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows of 32 tokens per step.")
@click.option("--warmup", type=click.IntRange(min=1), default=30, show_default=True,
              help="Warm-up steps of the warm-up condition (the other has none).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
              show_default=True, help="Peak learning rate.")
@_shared
@click.pass_context
def norm_cmd(ctx: click.Context, depths: str, steps: int, batch_size: int, warmup: int,
             lr: float, seeds: str, out: Path | None, svg: bool, threads: int, quiet: bool,
             force: bool) -> None:
    """Pre- vs post-LayerNorm at several depths, with and without warm-up (Xiong et al.
    2020): failure rate, final loss, and the gradient norm per layer at initialisation.

    \b
    Example:
      interp study norm --depths 2,6 --seeds 0 --steps 20 --out reports/study-norm-tiny
    """
    import torch

    opts = {"depths": int_list("--depths", depths, 1), "seeds": int_list("--seeds", seeds),
            "steps": steps, "batch_size": batch_size, "warmups": [0, warmup], "lr": lr,
            "progress": progress_bar(quiet)}
    out = prepare_out(ctx, out, force)
    if threads:
        torch.set_num_threads(threads)
    try:
        section = build_norm(opts)
    except InterpError as e:
        raise CliError(str(e)) from None
    _write(ctx, section, opts, out, force, svg, quiet, "interp study norm: pre- vs post-LN")


@study_group.command("masking")
@click.option("--strategies", default="causal,mlm,prefix,soft,learned", show_default=True,
              help="Comma-separated training masks: causal, mlm, prefix, soft, learned.")
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Adam steps per run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Windows of 32 tokens per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
              show_default=True, help="Peak learning rate.")
@_shared
@click.pass_context
def masking_cmd(ctx: click.Context, strategies: str, steps: int, batch_size: int, lr: float,
                seeds: str, out: Path | None, svg: bool, threads: int, quiet: bool,
                force: bool) -> None:
    """One model trained under causal, masked-LM, prefix-LM, soft and learned masks on the
    same data: loss, stability, and next-token vs cloze accuracy afterwards.

    \b
    Example:
      interp study masking --seeds 0 --steps 20 --out reports/study-masking-tiny
    """
    import torch

    from analyses.studies.masking import STRATEGIES

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise CliError(f"--strategies {strategies!r}: unknown {bad or 'empty'}; valid: "
                       f"{', '.join(STRATEGIES)}")
    opts = {"strategies": names, "seeds": int_list("--seeds", seeds), "steps": steps,
            "batch_size": batch_size, "lr": lr, "progress": progress_bar(quiet)}
    out = prepare_out(ctx, out, force)
    if threads:
        torch.set_num_threads(threads)
    try:
        section = build_masking(opts)
    except InterpError as e:
        raise CliError(str(e)) from None
    _write(ctx, section, opts, out, force, svg, quiet, "interp study masking: training masks")
