"""Report section and ``interp patch`` command: activation, attribution and path patching and
direct logit attribution on a clean/corrupted prompt-pair set (see :mod:`analyses.circuits`).

Thin by design: it builds the pairs (induction pairs for a model trained on the induction
task, IOI pairs for an English model), calls the analyses, and turns their frames into
figures, findings and a summary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses.app.cli import (
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    write_report,
)
from analyses.app.report import Section
from analyses.app.sections import register
from analyses.circuits.attribution import attribution_patching
from analyses.circuits.dla import direct_logit_attribution
from analyses.circuits.ioi import ioi_pairs
from analyses.circuits.metrics import METRICS
from analyses.circuits.pairs import PromptPairs, induction_pairs
from analyses.circuits.patching import activation_patching
from analyses.circuits.path_patching import path_patching
from interp.errors import InterpError
from interp.progress import Progress, progress_bar

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = ["build", "patch_cmd"]



def _default_model() -> str:
    """The packaged ``induction`` checkpoint (a known previous-token -> induction circuit,
    seconds to analyse) wherever interp is installed, else SmolLM2 (IOI)."""
    import interp

    path = Path(interp.__file__).resolve().parent / "data" / "induction.pt"
    return str(path) if path.is_file() else "smollm2-135m"


DEFAULT_MODEL = _default_model()
TASKS = ("auto", "induction", "ioi")
SOURCE = (
    "Meng et al. (2022), *Locating and Editing Factual Associations in GPT*, NeurIPS (causal "
    "tracing); Wang et al. (2022), *Interpretability in the Wild: a Circuit for Indirect Object "
    "Identification in GPT-2 small*, arXiv:2211.00593 (IOI prompts, ABC corruption, path "
    "patching); Nanda (2023), *Attribution Patching: Activation Patching At Industrial Scale*; "
    "Syed, Rager and Conmy (2023), *Attribution Patching Outperforms Automated Circuit "
    "Discovery*, arXiv:2310.10348; Heimersheim and Nanda (2024), *How to use and interpret "
    "activation patching*, arXiv:2404.15255; Elhage et al. (2021), *A Mathematical Framework "
    "for Transformer Circuits* (direct logit attribution, K-composition); Olsson et al. (2022), "
    "*In-context Learning and Induction Heads*."
)
METHOD = (
    "Clean/corrupted prompt pairs of equal length; the metric ({metric}) is read at the last "
    "position and normalised to 0 (corrupted) .. 1 (clean). **Activation patching**: each "
    "head's output (`hook_z`, every position) copied from the clean run into the corrupted "
    "one, many patches per forward (patched copies stacked along the batch). **Attribution "
    "patching**: (a_clean - a_corrupted) . dM/da at the corrupted run, every head from two "
    "forwards and a backward. **Path patching**: a sender head's output change added only to "
    "the receiver head's own q, k or v input (`hook_q_input` ...), every other path frozen. "
    "**Direct logit attribution**: the clean final residual split by component, divided by "
    "the cached final-norm scale and projected on the answer-minus-wrong unembedding "
    "direction (which carries the norm's gain); the parts sum to the logit difference up to "
    "the final norm's bias and b_U (`unowned`)."
)


def _task(model: HookedTransformer, task: str) -> str:
    if task != "auto":
        return task
    t = (getattr(model.cfg, "extra", None) or {}).get("task")
    return "induction" if isinstance(t, dict) and t.get("name") == "induction" else "ioi"


def make_pairs(model: HookedTransformer, task: str, n: int, seed: int,
               cue: int | None = None) -> tuple[PromptPairs, str]:
    """The prompt pairs for ``task`` and a sentence saying what they are."""
    if task == "induction":
        params = ((getattr(model.cfg, "extra", None) or {}).get("task") or {}).get("params", {})
        half, n_tok = int(params.get("half_len", 16)), int(params.get("n_tokens", 64))
        if 2 * half + 1 > model.cfg.n_ctx or n_tok + 1 > model.cfg.d_vocab:
            raise InterpError(f"The induction task needs a model with n_ctx >= {2 * half + 1} and "
                              f"a vocabulary of {n_tok + 1}; use --task ioi for this model.")
        return (induction_pairs(n, half_len=half, n_tokens=n_tok, cue=cue, seed=seed),
                f"{n} induction pairs `[BOS] x1..x{half} x1..xm` (answer x(m+1)), the first "
                f"x_m replaced by a fresh token in the corrupted prompt (seed {seed})")
    return (ioi_pairs(model, n, seed=seed),
            f"{n} IOI pairs from 6 name/place/object templates, ABC corruption (the second "
            f"subject mention replaced by a third name; seed {seed})")


def _pearson(a: pd.Series, b: pd.Series) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a.to_numpy(float), b.to_numpy(float))[0, 1])


def _scatter(heads: pd.DataFrame, r: float) -> Figure:
    from analyses.app import plots

    fig = plots.new_figure(5.5, 4.5)
    ax = fig.add_subplot()
    ax.scatter(heads["activation"], heads["attribution"], s=14, c=heads["layer"], cmap="viridis")
    lo = float(min(heads["activation"].min(), heads["attribution"].min(), 0))
    hi = float(max(heads["activation"].max(), heads["attribution"].max(), 1))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    for row in heads.reindex(heads["activation"].abs().sort_values().index[-5:]).itertuples():
        ax.annotate(f"L{row.layer}H{row.head}", (row.activation, row.attribution), fontsize=7)
    ax.set_xlabel("activation patching (normalised)")
    ax.set_ylabel("attribution patching (normalised)")
    ax.set_title(f"Heads: attribution vs activation patching\nPearson r = {r:.3f}; colour: layer")
    return fig


def _grid(df: pd.DataFrame, value: str, col: str = "head") -> pd.DataFrame:
    m = df.pivot(index="layer", columns=col, values=value).sort_index()
    m.index.name, m.columns.name = "layer", col
    return m


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


# Long because it runs the four methods in order, each feeding the next (path patching's
# receiver is activation patching's top head) and times each.
def build(model: HookedTransformer, opts: dict, progress: Progress) -> Section:
    """The patching section: heads by activation and attribution patching, residual stream by
    position (induction task), path patching into the top head's q/k/v, DLA per head."""
    from analyses.app import plots

    seed, bs = int(opts.get("seed") or 0), int(opts.get("batch_size") or 8)
    metric = opts.get("metric") or "logit_diff"
    task = _task(model, opts.get("task") or "auto")
    n = int(opts.get("pairs") or (48 if task == "induction" else 128))
    pairs, what = make_pairs(model, task, n, seed)
    timings, tables, figures = {}, {}, {}
    t0 = time.perf_counter()
    act = activation_patching(model, pairs, "head", metric=metric, batch_size=bs,
                              progress=progress)
    timings["activation_patching"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    attr = attribution_patching(model, pairs, "head", metric=metric, batch_size=bs,
                                progress=progress)
    timings["attribution_patching"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dla = direct_logit_attribution(model, pairs, batch_size=bs, progress=progress)
    timings["dla"] = time.perf_counter() - t0
    heads = act.rename(columns={"score": "activation", "metric": "activation_metric"}).merge(
        attr.rename(columns={"score": "attribution", "metric": "attribution_metric"}),
        on=["layer", "head"])
    head_dla = dla[dla["kind"] == "head"][["layer", "head", "attribution"]].astype(
        {"layer": int, "head": int}).rename(columns={"attribution": "dla"})
    heads = heads.merge(head_dla, on=["layer", "head"])
    r = _pearson(heads["activation"], heads["attribution"])
    base = pd.DataFrame([{"metric": metric, "clean": act.attrs["clean"],
                          "corrupted": act.attrs["corrupted"], "n_pairs": len(pairs),
                          "pearson_heads": r, "dla_sum": float(dla["attribution"].sum()),
                          "dla_unowned": dla.attrs["unowned"]}])
    tables.update(patch_baseline=base, patch_heads=heads, patch_dla=dla)
    figures["patch_heads"] = plots.heatmap(
        _grid(heads, "activation"), cmap="RdBu_r", center=0,
        title=f"Activation patching of each head's output ({metric}, 0 = corrupted, 1 = clean)")
    figures["patch_attribution_vs_activation"] = _scatter(heads, r)
    figures["patch_dla"] = plots.heatmap(_grid(heads, "dla"), cmap="RdBu_r", center=0,
                                         title="Direct logit attribution per head (clean run)")
    tables["patch_resid"], figures["patch_resid"] = _resid_part(
        model, task, pairs, n, seed, metric, bs, progress, timings)
    path = _path_part(model, pairs, heads, metric, bs, progress, timings)
    if path is not None:
        tables["patch_path"] = path
    summary = _summary(base, heads, path, metric) + [_resid_finding(tables["patch_resid"])]
    return Section(
        key="patch", title="Circuits: activation, attribution and path patching, DLA",
        method=METHOD.format(metric=metric), source=SOURCE,
        data=f"{what}.", findings=summary[1:], tables=tables, figures=figures,
        show_tables={"patch_baseline": 1, "patch_heads": 20, **(
            {"patch_path": 30} if path is not None else {})},
        timings=timings, summary=summary, summary_figure="patch_heads")


def _resid_part(model: HookedTransformer, task: str, pairs: PromptPairs, n: int, seed: int,
                metric: str, bs: int, progress: Progress, timings: dict,
                ) -> tuple[pd.DataFrame, Figure]:
    """The residual stream patched by (layer, position) on pairs that share their positions:
    induction pairs with a fixed cue, or IOI pairs of one template (at most 16 / 32 pairs);
    columns are labelled by the first clean prompt's tokens."""
    from analyses.app import plots

    t0 = time.perf_counter()
    if task == "induction":
        half = int(pairs.clean[0].shape[0] // 2)
        same, _ = make_pairs(model, task, min(n, 16), seed, cue=half // 2)
        where = f"the corrupted token at position {half // 2}"
    else:
        same = ioi_pairs(model, min(n, 32), seed=seed, template=0)
        where = "IOI template 0, the corrupted second subject mention (S2)"
    resid = activation_patching(model, same, "resid_pre", metric=metric, batch_size=bs,
                                progress=progress)
    timings["resid_patching"] = time.perf_counter() - t0
    grid = _grid(resid, "score", "pos")
    if getattr(model, "tokenizer", None) is not None:
        words = model.to_str_tokens(same.clean[0])
        grid.columns = [f"{p} {words[p]!r}" for p in grid.columns]
    fig = plots.heatmap(grid, cmap="RdBu_r", center=0, annotate=False,
                        title=f"Residual stream patching by (layer, position); {where}")
    return resid, fig


def _path_part(model: HookedTransformer, pairs: PromptPairs, heads: pd.DataFrame, metric: str,
               bs: int, progress: Progress, timings: dict) -> pd.DataFrame | None:
    """Path patching into the q, k and v inputs of the head activation patching ranks first
    (outside layer 0), from the 10 earlier heads it ranks highest, on at most 32 pairs."""
    later = heads[heads["layer"] > 0]
    if later.empty:
        return None
    t0 = time.perf_counter()
    top = later.loc[later["activation"].idxmax()]
    layer, head = int(top["layer"]), int(top["head"])
    earlier = heads[heads["layer"] < layer].sort_values("activation", ascending=False).head(10)
    senders = [(int(r.layer), int(r.head)) for r in earlier.itertuples()]
    sub = PromptPairs(pairs.clean[:32], pairs.corrupted[:32], pairs.answer[:32],
                      pairs.wrong[:32])
    n_kv = model.cfg.n_kv_heads or model.cfg.n_heads
    frames = []
    for x in "qkv":
        h = head if x == "q" else head // (model.cfg.n_heads // n_kv)
        df = path_patching(model, sub, [f"L{layer}H{h}.{x}"], senders=senders, metric=metric,
                           batch_size=bs, progress=progress)
        frames.append(df.assign(receiver=f"L{layer}H{h}.{x}", input=x))
    timings["path_patching"] = time.perf_counter() - t0
    return pd.concat(frames, ignore_index=True).rename(
        columns={"layer": "sender_layer", "head": "sender_head"})


def _summary(base: pd.DataFrame, heads: pd.DataFrame, path: pd.DataFrame | None,
             metric: str) -> list[str]:
    """Three to five findings read from patch_baseline.csv, patch_heads.csv, patch_path.csv."""
    b = base.iloc[0]
    top = heads.sort_values("activation", ascending=False).head(5)
    big = heads.loc[heads["dla"].abs().idxmax()]
    out = [f"Clean {metric} {_g(b['clean'])} against corrupted {_g(b['corrupted'])} (mean over "
           f"{int(b['n_pairs'])} pairs).",
           "Heads whose patching restores the clean metric most: " + ", ".join(
               f"L{r.layer}H{r.head} ({r.activation:.2f})" for r in top.itertuples()) + ".",
           f"Attribution patching against activation patching over all {len(heads)} heads: "
           f"Pearson r = {_g(b['pearson_heads'])}.",
           f"Direct logit attribution: the components sum to {_g(b['dla_sum'])}, plus "
           f"{_g(b['dla_unowned'])} from the final norm's bias and b_U; largest head: "
           f"L{int(big['layer'])}H{int(big['head'])} ({big['dla']:.3g})."]
    if path is not None and len(path):
        best = path.loc[path["score"].abs().idxmax()]
        by = path.groupby("input")["score"].apply(lambda s: s.abs().max())
        out.append(f"Path patching into {best['receiver'].split('.')[0]}: the strongest path is "
                   f"L{int(best['sender_layer'])}H{int(best['sender_head'])} -> its "
                   f"{best['input']} input ({best['score']:.2f}); largest |score| via q "
                   f"{_g(by.get('q', math.nan))}, k {_g(by.get('k', math.nan))}, v "
                   f"{_g(by.get('v', math.nan))}.")
    return out


def _resid_finding(resid: pd.DataFrame) -> str:
    """Where the effect sits in the residual stream: the position that carries it into the
    first layer, and the first layer from which the final position carries half of it."""
    last = int(resid["pos"].max())
    first = resid[resid["layer"] == resid["layer"].min()]
    src = first.loc[first["score"].idxmax()]
    at_end = resid[(resid["pos"] == last) & (resid["score"] >= 0.5)]["layer"]
    end = f"from layer {int(at_end.min())} on" if len(at_end) else "at no layer"
    return (f"Residual stream by (layer, position): entering block {int(src['layer'])} the "
            f"effect sits at position {int(src['pos'])} (score {src['score']:.2f}); the final "
            f"position {last} carries at least half of it {end}.")


def applies(model: HookedTransformer) -> bool:
    """A decoder with an LM head that has its pairs: trained on induction, or a tokenizer that
    reads the IOI names as single tokens (not an encoder, not a toy word vocabulary)."""
    from analyses.circuits.ioi import NAMES, single_tokens

    if not model.cfg.has_unembed or model.cfg.mask.is_full:
        return False
    return _task(model, "auto") == "induction" or len(single_tokens(model, NAMES[:6])) >= 3


register("patch", title="Circuits (patching)", build=build, applies=applies,
         default_model=DEFAULT_MODEL, order=60)


@cli.command("patch")
@model_argument(DEFAULT_MODEL)
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True,
              help="Prompt pairs: induction (models trained on it) or IOI; auto picks.")
@click.option("--pairs", "n_pairs", type=click.IntRange(min=1), default=None,
              help="Number of prompt pairs [default: 48 induction, 128 IOI].")
@click.option("--metric", type=click.Choice(list(METRICS)), default="logit_diff",
              show_default=True, help="Metric read at the last position.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def patch_cmd(ctx: click.Context, model: str, task: str, n_pairs: int | None, metric: str,
              svg: bool, out: Path | None, batch_size: int, max_tokens: int | None, device: str,
              dtype: str, seed: int, quiet: bool, force: bool) -> None:
    """Activation, attribution and path patching and direct logit attribution of MODEL on
    clean/corrupted prompt pairs (induction pairs or IOI).

    Writes data/patch_heads.csv (per head: activation and attribution patching, DLA),
    data/patch_dla.csv, data/patch_path.csv, data/patch_resid.csv (residual stream by layer
    and position on pairs of one template) and figures.

    \b
    Example:
      interp patch interp/data/induction.pt --out reports/patch_induction

    On SmolLM2, `--task ioi --pairs 100` patches all 270 heads on every pair in about 13
    minutes on one loaded CPU core (each pair batch's shared prefix runs once into a KV cache
    and each patched forward starts at the patched block); use --device cuda where you have
    one.
    """
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    opts = {"model_source": model, "batch_size": batch_size, "max_tokens": max_tokens,
            "device": device, "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg,
            "task": task, "pairs": n_pairs, "metric": metric}
    section = build(m, opts, progress_bar(quiet))
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, svg=svg, quiet=quiet, title=f"interp patch: {model}")
