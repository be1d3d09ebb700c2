"""Report section and ``interp ffn`` command: FFN knowledge storage (see :mod:`analyses.ffn`).

Thin by design: it picks the facts and the corpus, calls :func:`analyses.ffn.analyse`,
turns the frames into figures and findings, and hands everything to the report writer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import pandas as pd

from analyses import ffn as fk
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
from analyses.app.sections._ffn_figures import (
    KIND_TITLES,
    agreement_figure,
    edits_figure,
    example_figure,
    logit_lens_figure,
    trace_figure,
)
from analyses.app.sections._summaries import ffn_summary
from interp.progress import progress_bar

SOURCE = (
    "Geva, Schuster, Berant and Levy (2021), *Transformer Feed-Forward Layers Are Key-Value "
    "Memories*, EMNLP (top-25 trigger contexts per key, value vectors read through the output "
    "embedding, agreement of a value's top token with its triggers' next token); Dai, Dong, Hao, "
    "Sui, Chang and Wei (2022), *Knowledge Neurons in Pretrained Transformers*, ACL (integrated "
    "gradients over FFN activations, threshold 0.2 x max, refinement across paraphrases, "
    "suppress/amplify: -29.03% / +31.17% on BERT-base); Sundararajan, Taly and Yan (2017), "
    "*Axiomatic Attribution for Deep Networks*, ICML (integrated gradients, completeness); Meng, "
    "Bau, Andonian and Belinkov (2022), *Locating and Editing Factual Associations in GPT*, "
    "NeurIPS (causal tracing: subject noise at 3 x the embedding std, restoration of hidden "
    "states, MLP and attention outputs with a 10-layer window, average indirect effect); Zhang "
    "and Nanda (2024), *Towards Best Practices of Activation Patching in Language Models: "
    "Metrics and Methods*, ICLR (symmetric token replacement instead of noise); nostalgebraist "
    "(2020), *interpreting GPT: the logit lens*, LessWrong."
)


def _default_model() -> str:
    """The packaged ``knowledge`` checkpoint when it exists (facts with ground truth, seconds
    to analyse), else SmolLM2."""
    import interp

    path = Path(interp.__file__).resolve().parent / "data" / "knowledge.pt"
    return str(path) if path.is_file() else "smollm2-135m"


def applies(model: Any) -> bool:
    """Decoders with a vocabulary head and dense FFNs (not MiniLM, not MoE-only models)."""
    try:
        fk.check_model(model)
    except ValueError:
        return False
    return getattr(model, "tokenizer", None) is not None or fk._task_name(model) == "knowledge"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


# ------------------------------------------------------------------------------------ findings
def _trace_findings(avg: pd.DataFrame, window: int) -> list[str]:
    out = []
    for corruption in ("noise", "replace"):
        sub = avg[avg["corruption"] == corruption]
        if sub.empty:
            continue
        parts = []
        for kind in ("resid", "mlp", "attn", "mlp_single"):
            k = sub[sub["kind"] == kind]
            if k.empty:
                continue
            best = k.loc[k["aie"].idxmax()]
            parts.append(f"{KIND_TITLES[kind]} peaks at {best['role'].replace('_', ' ')}, "
                         f"layer {int(best['layer'])} (AIE {_fmt(float(best['aie']))})")
        out.append(f"Causal tracing ({corruption}): " + "; ".join(parts) + ".")
        mlp = sub[sub["kind"] == "mlp"]
        if not mlp.empty:
            L = int(sub["layer"].max()) + 1
            early = mlp[mlp["layer"] < max(1, L // 2)]
            subj = early[early["role"] == "subject_last"]["aie"]
            last = early[early["role"] == "last"]["aie"]
            if len(subj) and len(last):
                verdict = "appears" if float(subj.max()) > float(last.max()) else "does not appear"
                out.append(f"Early MLP site at the last subject token ({corruption}): in the "
                           "first half of the layers, windowed MLP restoration at the last subject "
                           f"token reaches AIE {_fmt(float(subj.max()))} vs "
                           f"{_fmt(float(last.max()))} at the last token, so Meng et al.'s early "
                           f"site {verdict} (window {window} layers).")
            single = sub[(sub["kind"] == "mlp_single") & (sub["role"] == "subject_last")]
            if not single.empty:
                top = single.loc[single["aie"].idxmax()]
                rest = single[single["layer"] != top["layer"]]
                text = (f"Single-layer MLP restoration at the last subject token ({corruption}) "
                        f"peaks at layer {int(top['layer'])} (AIE {_fmt(float(top['aie']))})")
                if not rest.empty:
                    nxt = rest.loc[rest["aie"].idxmax()]
                    text += (f"; the next best single layer is {int(nxt['layer'])} "
                             f"(AIE {_fmt(float(nxt['aie']))})")
                # windows that leave the single-layer peak out: what the other layers do together
                lo = int(top["layer"])
                centres = mlp["layer"].to_numpy()
                inside = (centres - window // 2 <= lo) & (lo < centres - (-window // 2))
                away = mlp[(mlp["role"] == "subject_last").to_numpy() & ~inside]
                if not away.empty and window > 1:
                    best_away = float(away["aie"].max())
                    share = "mostly" if best_away < 0.5 * float(top["aie"]) else "not only"
                    text += (f"; windows without layer {lo} reach at most AIE {_fmt(best_away)}, "
                             f"so the windowed early site is {share} that one layer")
                out.append(text + ".")
    return out


def _edit_findings(summary: pd.DataFrame, kn: pd.DataFrame) -> list[str]:
    if summary.empty:
        return ["No fact kept any knowledge neuron after refinement, so nothing was edited."]
    get = {(r.mode, r.target): r for r in summary.itertuples()}
    kept = kn[kn["kept"]]
    per_fact = kept.groupby("fact").size()
    median = float(per_fact.median()) if len(per_fact) else float("nan")
    by_layer = kept["layer"].value_counts().sort_index().items()
    out = [f"Knowledge neurons: {len(kept)} kept over {per_fact.size} facts (median "
           f"{_fmt(median)} per fact; {int((~kn['kept']).sum())} refined neurons dropped because "
           "facts with other answers share them); layers of kept neurons: "
           f"{', '.join(f'{int(k)}: {int(v)}' for k, v in by_layer)}."]
    for mode, dai in (("suppress", fk.DAI_SUPPRESS), ("amplify", fk.DAI_AMPLIFY)):
        s, u = get.get((mode, "self")), get.get((mode, "unrelated"))
        if s is None:
            continue
        text = (f"{mode.capitalize()} (x{0 if mode == 'suppress' else 2}): the fact's answer "
                f"probability changes by {_pct(s.mean_rel_change)} on average")
        if u is not None:
            text += (f", unrelated facts by {_pct(u.mean_rel_change)} (mean |change| "
                     f"{100 * u.mean_abs_rel_change:.1f}%)")
        out.append(text + f"; Dai et al. report {_pct(dai)} for BERT.")
    return out


def _lens_findings(ll: pd.DataFrame) -> list[str]:
    if ll.empty:
        return []
    top1 = ll.assign(top1=ll["answer_rank"] == 1).groupby("layer")["top1"].mean()
    first = next((int(layer) for layer, v in top1.items() if v >= 0.5), None)
    mean_p = ll.groupby("layer")["answer_prob"].mean()
    half = next((int(layer) for layer, v in mean_p.items()
                 if v >= 0.5 * float(mean_p.iloc[-1])), None)
    return [f"Logit lens: the answer is the top token for at least half of the facts from layer "
            f"{first} on; the mean answer probability reaches half its final value "
            f"({_fmt(float(mean_p.iloc[-1]))}) at layer {half}."]


def _kv_findings(agreement: pd.DataFrame, n_tokens: int, top_k: int) -> list[str]:
    if agreement.empty:
        return []
    upper = agreement[agreement["layer"] >= agreement["layer"].max() / 2]
    lower = agreement[agreement["layer"] < agreement["layer"].max() / 2]
    return [f"Key-value memories over {n_tokens} corpus tokens (top-{top_k} triggers per neuron): "
            "in the upper half of the layers a value's top token is the next token of its top "
            f"trigger for {100 * float(upper['agreement_top1'].mean()):.1f}% of neurons (shuffled "
            f"baseline {100 * float(upper['baseline_top1'].mean()):.1f}%), and of any "
            f"top-{top_k} trigger for {100 * float(upper['agreement_any'].mean()):.1f}% "
            f"(baseline {100 * float(upper['baseline_any'].mean()):.1f}%); lower half: "
            f"{100 * float(lower['agreement_top1'].mean()):.1f}% "
            f"(Geva et al. find agreement rising in the upper layers)."]


def _method(opts: dict, window: int) -> str:
    """The section's method paragraph: what each method did with this run's settings."""
    positions = ("; one position per role is traced (the middle-most of several). "
                 if opts.get("positions", "roles") == "roles"
                 else "; every position from the subject on is traced. ")
    return (
        "**Facts.** Each fact is a prompt, its subject and the answer; only facts whose answer's "
        "first token is the model's greedy prediction are kept. "
        "**Causal tracing** (Meng et al. 2022): the subject's token embeddings are corrupted with "
        f"Gaussian noise (3 x the subject embeddings' std, {opts.get('samples', 3)} samples; Meng "
        "et al. used 10) or by replacing the subject with another subject of the same token "
        "length (Zhang and Nanda 2024); then the clean state is restored at one (layer, "
        "position): the residual stream (`hook_resid_post`), the MLP output (`hook_mlp_out`) or "
        f"the attention output (`hook_attn_out`), the latter two over a window of {window} "
        "layer(s) centred there (Meng et al. used 10 of GPT-2 XL's 48) and, for the MLP, one "
        "layer alone. Indirect effect = P(answer | restored) - P(answer | corrupted); heatmaps "
        "average it over facts per position role (first/middle/last subject token, first/further "
        "subsequent token, last token)"
        + positions
        + "**Knowledge neurons** (Dai et al. 2022): integrated gradients of P(answer) w.r.t. each "
        "layer's FFN activations (`mlp.hook_post`) at the prediction position (zero baseline, "
        f"{opts.get('ig_steps', 20)} midpoint-Riemann steps); neurons above 0.2 x the prompt's "
        "maximum, kept by at least 70% of the fact's prompts (prompt and paraphrases), minus "
        "neurons also kept by facts with other answers; then those neurons are set to 0 "
        "(suppress) or doubled (amplify) at the prediction position, on the fact's prompts and "
        "on 10 unrelated facts. "
        "**Key-value memories** (Geva et al. 2021): per neuron the top-25 activating contexts over "
        "the corpus (running top-k, bounded memory), the value vector (row of `W_out`, times the "
        "final norm's gain) read through the unembedding, and per layer the share of neurons "
        "whose value's top token is the next token of their top trigger, against values paired "
        "with shuffled neurons' triggers. "
        "**Logit lens** (nostalgebraist 2020): each layer's residual stream at the prediction "
        "position through the final norm and the unembedding: answer probability and rank, "
        "KL(final || layer)."
    )


def _products_note(products: str) -> str:
    """How causal tracing multiplied, so a reader can tell a bfloat16 run from a float32 one
    (their probabilities differ by up to ~0.02 on SmolLM2)."""
    if products != "bfloat16":
        return " All products in float32."
    return (" Causal tracing multiplied in bfloat16 with float32 sums, residual stream, norms "
            "and softmaxes (`--products bfloat16`: on SmolLM2 probabilities move by up to "
            "~0.02 against float32, BENCHMARKS.md \"FFN throughput\"); everything else in "
            "float32.")


# ------------------------------------------------------------------------------------- builder
def build(model: Any, opts: dict, progress: Any) -> Section:
    """Run :func:`analyses.ffn.analyse` and assemble the report section."""
    fk.check_model(model)
    facts_path = opts.get("facts")
    facts = fk.load_facts(facts_path) if facts_path else None
    if facts is not None:
        facts_name = f"`{Path(facts_path).name}` (given)"
    elif fk._task_name(model) == "knowledge":
        facts_name = ("the knowledge base the model was trained on "
                      "(`interp.train.knowledge_facts`)")
    else:
        facts_name = "`analyses/data/facts.jsonl` (written for this project)"
    texts = opts.get("texts")
    res = fk.analyse(model, facts, texts, max_facts=opts.get("max_facts", 20),
                     n_samples=opts.get("samples", 3), n_replacements=opts.get("replacements"),
                     window=opts.get("window"), positions=opts.get("positions", "roles"),
                     ig_steps=opts.get("ig_steps", 20), kv_layers=opts.get("kv_layers"),
                     top_k=opts.get("top_k", 25), batch_size=opts.get("batch_size", 8),
                     max_tokens=opts.get("max_tokens"), seed=opts.get("seed", 0),
                     products=opts.get("products", "float32"),
                     progress=progress)
    chosen = res["facts"]
    findings = [f"Facts: the model gets {res['n_known']} of {res['n_facts']} right (greedy next "
                f"token = the answer's first token); {len(chosen)} of them are analysed below."]
    tables: dict[str, pd.DataFrame] = {"ffn_facts": res["predictions"]}
    figures: dict[str, Any] = {}
    if chosen:
        avg = res["trace_average"]
        findings += _trace_findings(avg, res["window"])
        findings += _edit_findings(res["edit_summary"], res["knowledge_neurons"])
        findings += _lens_findings(res["logit_lens"])
        for corruption, label in (("noise", "Gaussian noise on the subject"),
                                  ("replace", "subject replaced")):
            if (avg["corruption"] == corruption).any():
                figures[f"ffn_trace_{corruption}"] = trace_figure(
                    avg, corruption, f"average indirect effect over {len(chosen)} facts ({label})")
        traced = res["causal_trace"].groupby("fact")["position"].nunique()
        figures["ffn_trace_example"] = example_figure(res["causal_trace"], str(traced.idxmax()),
                                                      "noise")
        figures["ffn_logit_lens"] = logit_lens_figure(res["logit_lens"])
        if not res["edit_summary"].empty:
            figures["ffn_edits"] = edits_figure(res["edit_summary"])
        tables.update({"causal_trace": res["causal_trace"], "ffn_trace_average": avg,
                       "knowledge_neurons": res["knowledge_neurons"], "ffn_edits": res["edits"],
                       "ffn_edit_summary": res["edit_summary"], "logit_lens": res["logit_lens"]})
    findings += _kv_findings(res["kv_agreement"], res["kv_tokens"], opts.get("top_k", 25))
    figures["ffn_kv_agreement"] = agreement_figure(res["kv_agreement"])
    tables.update({"kv_memories": res["kv_memories"], "kv_agreement": res["kv_agreement"],
                   "kv_triggers": res["kv_triggers"]})
    method = _method(opts, res["window"]) + _products_note(res["products"])
    corpus = opts.get("text_name") or (
        "the knowledge task's training sequences" if fk._task_name(model) == "knowledge"
        else "`analyses/data/sample_text.txt` (40 sentences written for this project) "
             "and the facts' prompts with their answers")
    data = (f"Facts: {facts_name}. Corpus for key-value memories: {corpus} "
            f"({res['kv_tokens']} tokens).")
    show = {"ffn_facts": 20, "ffn_edit_summary": 0, "ffn_trace_average": 0, "kv_agreement": 0,
            "kv_triggers": 60}
    return Section(key="ffn", title="FFN knowledge storage", method=method, source=SOURCE,
                   data=data, findings=findings, tables=tables, figures=figures,
                   show_tables={k: v for k, v in show.items()
                                if k in tables and k != "ffn_trace_average"},
                   timings={k: float(v) for k, v in res["timings"].items()},
                   summary=ffn_summary(res),
                   summary_figure="ffn_trace_noise" if "ffn_trace_noise" in figures
                   else "ffn_kv_agreement")


register("ffn", title="FFN knowledge storage", build=build, applies=applies,
         default_model=_default_model(), order=30)


def _parse_layers(value: str | None, n_layers: int) -> list[int] | None:
    if value is None or value.strip().lower() == "all":
        return None
    try:
        layers = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise CliError("--kv-layers must be 'all' or comma-separated layer numbers, got "
                       f"{value!r}") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise CliError(f"--kv-layers {value!r}: layers must be between 0 and {n_layers - 1}")
    return layers


@cli.command("ffn")
@model_argument(default=_default_model())
@click.option("--facts", "facts_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="JSONL facts (prompt, subject, answer, optional paraphrases) [default: the "
                   "model's own knowledge base, else analyses/data/facts.jsonl].")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="UTF-8 text for key-value memories, one sequence per line [default: the "
                   "shipped sample text].")
@click.option("--max-facts", type=click.IntRange(min=1), default=20, show_default=True,
              help="Known facts analysed.")
@click.option("--samples", type=click.IntRange(min=1), default=3, show_default=True,
              help="Noise samples (and replacement subjects) per fact for causal tracing (Meng "
                   "et al.: 10; time grows linearly).")
@click.option("--replacements", type=click.IntRange(min=1), default=None,
              help="Replacement subjects per fact (token-replacement corruption) [default: "
                   "--samples].")
@click.option("--positions", type=click.Choice(["all", "roles"]), default="roles",
              show_default=True,
              help="Trace one position per role (first/middle/last subject token, first/further "
                   "subsequent token, last token), or every position from the subject on (slower "
                   "on long prompts).")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Layers restored together for MLP/attention [default: min(10, n_layers // 3 "
                   "+ 1)].")
@click.option("--ig-steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Integrated-gradients steps.")
@click.option("--kv-layers", default="all", show_default=True,
              help="Layers for key-value memories: all or 0,5,11.")
@click.option("--top-k", type=click.IntRange(min=1), default=25, show_default=True,
              help="Trigger contexts kept per neuron.")
@click.option("--products", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True,
              help="How causal tracing multiplies: float32, or bfloat16 products with float32 "
                   "sums and residual stream (1.8x faster tracing on CPUs with AMX and on "
                   "GPUs; SmolLM2's probabilities move by up to ~0.02).")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def ffn_cmd(ctx: click.Context, model: str, facts_file: Path | None, text_file: Path | None,
            max_facts: int, samples: int, replacements: int | None, positions: str,
            window: int | None, ig_steps: int, kv_layers: str, top_k: int, products: str,
            svg: bool,
            out: Path | None, batch_size: int, max_tokens: int | None, device: str, dtype: str,
            seed: int, quiet: bool, force: bool) -> None:
    """Where MODEL keeps what it knows: causal tracing, knowledge neurons, key-value memories
    and the logit lens over known facts.

    Writes data/causal_trace.csv, data/knowledge_neurons.csv, data/kv_memories.csv,
    data/logit_lens.csv (and more), trace heatmaps, the logit-lens curve, and trigger
    contexts with promoted tokens of a few neurons. MODEL defaults to the shipped knowledge
    model (its own facts, seconds). On a real model (smollm2-135m, facts from
    analyses/data/facts.jsonl or --facts) causal tracing costs minutes per fact on a CPU:
    --max-facts and --samples bound it.

    \b
    Example:
      interp ffn --out reports/ffn_knowledge      # the shipped knowledge model
      interp ffn interp/data/knowledge.pt --max-facts 50 --samples 5 --out reports/ffn_more
    """
    # bad files fail before loading a model
    facts = fk.load_facts(facts_file) if facts_file is not None else None
    texts = None
    if text_file is not None:
        try:
            lines = text_file.read_text(encoding="utf-8").splitlines()
            texts = [ln for ln in lines if ln.strip()]
        except FileNotFoundError:
            raise CliError(f"text file not found: {text_file}") from None
        except UnicodeDecodeError:
            raise CliError(f"text file {text_file} is not UTF-8 text") from None
        if not texts:
            raise CliError(f"text file {text_file} is empty")
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    fk.check_model(m)
    if facts is not None:
        fk.prepare_facts(m, facts)  # subjects and tokens checked before the slow work
    opts = {"model_source": model, "batch_size": batch_size, "max_tokens": max_tokens,
            "device": device, "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg,
            "facts": str(facts_file) if facts_file else None, "texts": texts,
            "text_name": f"`{text_file.name}`" if text_file else None, "max_facts": max_facts,
            "samples": samples, "replacements": replacements, "positions": positions,
            "window": window, "ig_steps": ig_steps, "products": products,
            "kv_layers": _parse_layers(kv_layers, m.cfg.n_layers), "top_k": top_k}
    section = build(m, opts, progress_bar(quiet))
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed, ctx=ctx,
                 svg=svg, quiet=quiet, title=f"interp ffn: {model}")


__all__ = ["applies", "build", "ffn_cmd"]
