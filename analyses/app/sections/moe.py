"""Report section and ``interp moe`` command: MoE expert specialisation (see :mod:`analyses.moe`).

Thin by design: it picks the corpus (text files, one domain each, or a ``domains`` task
stream; see :mod:`analyses.app.sections._moe_corpus`), calls
:func:`analyses.moe.routing_stats` and :func:`analyses.moe.expert_ablation`, and turns their
frames into figures, findings and CSVs for the report writer.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click
import pandas as pd

from analyses import moe
from analyses.app.cli import (
    CliError,
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    progress_for,
    write_report,
)
from analyses.app.report import Section
from analyses.app.sections import register
from analyses.app.sections._moe_corpus import (
    DEFAULT_ABLATION_TOKENS,
    DEFAULT_SEQ_LEN,
    _corpus,
)
from analyses.app.sections._summaries import moe_summary

# expert x domain heatmaps drawn (first, last and evenly spaced layers); the CSV has all
MAX_HEATMAPS = 4
MAX_ABLATION_JOBS = 128  # default ablation covers at most this many (layer, expert) pairs
SHIPPED_MODEL = str(Path(__file__).resolve().parents[3] / "interp" / "data" / "domains_moe.pt")

SOURCE = (
    "Jiang et al. (2024), *Mixtral of Experts*, arXiv:2401.04088, sec. 5 (expert x domain "
    "assignment, fig. 7; consecutive-token same-expert rates against random assignment, table 5); "
    "Xue et al. (2024), *OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models*, "
    "ICML, sec. 4 (context-independent, token-id specialisation); Muennighoff et al. (2024), "
    "*OLMoE: Open Mixture-of-Experts Language Models*, arXiv:2409.02060, sec. 5 (domain and "
    "vocabulary specialisation, cross-layer co-activation); Shazeer et al. (2017), *Outrageously "
    "Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer*, ICLR (top-k routing, "
    "load CV); Fedus, Zoph and Shazeer (2022), *Switch Transformers*, JMLR (load balancing); Vinh, "
    "Epps and Bailey (2010), *Information Theoretic Measures for Clusterings Comparison*, JMLR "
    "(normalised and adjusted mutual information); Patefield (1981), *An Efficient Method of "
    "Generating Random R x C Tables with Given Row and Column Totals*, Applied Statistics 30 "
    "(permutation nulls from the margins); Michel, Levy and Neubig (2019), *Are Sixteen Heads "
    "Really Better than One?*, NeurIPS (ablation protocol)."
)

METHOD = (
    "The corpus streams through the model batch by batch; the hooks "
    "`blocks.{l}.mlp.hook_router_logits`, `hook_expert_indices` and `hook_expert_weights` of every "
    "MoE layer are reduced into fixed-size counts (memory does not grow with the corpus). "
    "**Load**: share of tokens per expert as first choice and in the top-k; coefficient of "
    "variation (baseline: the CV of uniformly random assignment, sqrt((E-1)/n)) and max/mean; "
    "router entropy per token and of the aggregate load, divided by log E (1 = a router that does "
    "not discriminate). **Domains** (Mixtral fig. 7): share = P(expert in top-k | domain) / k (1/E "
    "under uniform routing); normalised mutual information NMI = I(first expert; domain) / "
    "min(H(expert), H(domain)) (1 when one determines the other); per expert a specialisation "
    "index KL(P(domain | expert) || P(domain)) in bits (MI is its load-weighted mean). Each is "
    "compared with its permutation distribution (domain labels shuffled over tokens), sampled "
    "exactly as random contingency tables with the observed margins (Patefield 1981), so no "
    "per-token pairs are kept; p = (1 + #null >= observed) / (1 + n_perm); AMI = (I - E_null I) / "
    "(min H - E_null I). **Tokens** (OpenMoE): NMI of first expert and token id over tokens seen "
    "at least `min_token_count` times, and the share of a token's occurrences going to its most "
    "common expert (occurrence-weighted), both against the same permutation null, which is the "
    "right chance level for rare tokens. **Consecutive tokens** (Mixtral table 5): P(first expert "
    "of t = first expert of t+1) against sum_e f_e^2 (independent draws from the measured load) "
    "and 1/E; P(top-k sets of t and t+1 intersect) against all pairs of a uniform reservoir sample "
    "of routed tokens and against a uniform router (1 - C(E-k,k)/C(E,k)). **Cross-layer**: NMI of "
    "first experts between every pair of MoE layers, with its permutation baseline. **Margins**: "
    "w1 - w2 of the renormalised top-k weights and the logit gap between the k-th and (k+1)-th "
    "expert, with near-tie rates, against a router with i.i.d. Gaussian logits of the measured "
    "per-token spread. **Ablation**: one expert masked with `model.set_expert_mask` (the router "
    "renormalises over the rest), next-token loss change per domain (the domain of the predicted "
    "token); the expert routing ties most to a domain (highest lift P(domain | expert) / "
    "P(domain)) is checked against the domain its removal hurts most."
)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"p = {p:.2g}"


def is_moe(model: Any) -> bool:
    """Whether the MoE section applies: some layer of the model is a mixture of experts."""
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and getattr(cfg, "n_experts", 0) and hasattr(model, "blocks")
                and any(cfg.is_moe_layer(i) for i in range(cfg.n_layers)))


def _heat_layers(layers: list[int]) -> list[int]:
    if len(layers) <= MAX_HEATMAPS:
        return layers
    idx = sorted({round(i * (len(layers) - 1) / (MAX_HEATMAPS - 1)) for i in range(MAX_HEATMAPS)})
    return [layers[i] for i in idx]


def _ablation_layers(model: Any, spec: str | None) -> list[int]:
    layers = moe.moe_layers(model)
    if spec:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise CliError(f"--ablation-layers must be comma-separated layer indices, "
                           f"got {spec!r}") from None
        bad = [x for x in chosen if x not in layers]
        if bad:
            raise CliError(f"--ablation-layers {bad} are not MoE layers; MoE layers: {layers}")
        return chosen
    per = max(1, MAX_ABLATION_JOBS // model.cfg.n_experts)
    return _heat_layers(layers) if len(layers) > per else layers


def _findings(res: moe.MoEResult, abl: pd.DataFrame | None, abl_sum: pd.DataFrame | None,
              min_count: int) -> list[str]:
    s = res.summary
    out = []
    E, k = int(s["n_experts"].iloc[0]), int(s["top_k"].iloc[0])
    out.append(f"Load over {int(s['n_tokens'].iloc[0])} tokens per layer, {E} experts, top-{k}: "
               f"CV of top-k load {_fmt(s['cv_topk'].min())} to {_fmt(s['cv_topk'].max())} across "
               f"layers (random uniform assignment: {_fmt(s['cv_random'].iloc[0])}); max/mean up "
               f"to {_fmt(s['max_over_mean_topk'].max())}; per-token router entropy "
               f"{_fmt(s['router_entropy'].mean())} of log E on average (1 = no preference).")
    if "nmi_domain" in s and s["nmi_domain"].notna().any():
        sig = s[s["p_value"] <= 0.01]
        best = s.loc[s["nmi_domain"].idxmax()]
        out.append(f"Domain specialisation: NMI(expert; domain) above its permutation baseline "
                   f"with p <= 0.01 in {len(sig)} of {len(s)} MoE layers; strongest in layer "
                   f"{int(best['layer'])}: NMI {_fmt(best['nmi_domain'])} vs "
                   f"{_fmt(best['nmi_domain_baseline'])} under shuffled labels (95th percentile "
                   f"{_fmt(best['nmi_domain_p95'])}, {_p(best['p_value'])}, "
                   f"AMI {_fmt(best['ami_domain'])}).")
        ex = res.experts.dropna(subset=["p_value"])
        if len(ex):
            n_sig = int((ex["p_value"] <= 0.01).sum())
            top = (ex[ex["p_value"] <= 0.01]
                   .sort_values("spec_index_bits", ascending=False).head(3))
            out.append(f"{n_sig} of {len(ex)} (layer, expert) pairs have a domain distribution "
                       f"different from the corpus mix (p <= 0.01)"
                       + ("." if top.empty else "; most specialised: ") + ", ".join(
                           f"L{int(r.layer)}E{int(r.expert)} -> {r.top_domain} "
                           f"({r.top_domain_share:.0%} of its tokens, {r.spec_index_bits:.2f} "
                           f"bits vs {r.spec_index_baseline:.3f} null)"
                           for r in top.itertuples()) + ("" if top.empty else "."))
    if s["nmi_token"].notna().any():
        best = s.loc[s["nmi_token"].idxmax()]
        out.append(f"Token-id specialisation (context-independent routing): NMI(expert; token) "
                   f"up to {_fmt(best['nmi_token'])} (layer {int(best['layer'])}) vs "
                   f"{_fmt(best['nmi_token_baseline'])} under permutation "
                   f"({_p(best['token_p_value'])}); a token's most common expert takes "
                   f"{_fmt(best['top_expert_share'])} of its occurrences vs "
                   f"{_fmt(best['top_expert_share_baseline'])} by chance "
                   f"({int(best['token_types_counted'])} token types seen >= {min_count} times).")
    if s["consecutive_same_top1"].notna().any():
        parts = ", ".join(f"L{int(r.layer)} {r.consecutive_same_top1:.0%} "
                          f"(random {r.consecutive_random:.0%})" for r in s.head(6).itertuples())
        more = " ..." if len(s) > 6 else ""
        out.append(f"Consecutive tokens share their first-choice expert: {parts}{more}; uniform "
                   f"router {1 / E:.1%}. Top-{k} sets intersect: "
                   f"{_fmt(s['consecutive_overlap_topk'].mean())} on average vs "
                   f"{_fmt(s['consecutive_overlap_random'].mean())} for independent tokens "
                   f"({_fmt(s['consecutive_overlap_uniform'].iloc[0])} uniform).")
    if len(res.cross_layer):
        c = res.cross_layer.sort_values("nmi", ascending=False).iloc[0]
        out.append(f"Cross-layer routing agreement: highest NMI between first choices "
                   f"{_fmt(c['nmi'])} (layers {int(c['layer_a'])} and {int(c['layer_b'])}; "
                   f"shuffled {_fmt(c['nmi_baseline'])}).")
    if k >= 2 or k < E:
        out.append(f"Router margins: near ties between the top-2 weights (w1 - w2 < 0.05) in "
                   f"{_fmt(s['near_tie_top12'].mean())} of tokens (Gaussian-logit router "
                   f"{_fmt(s['near_tie_top12_baseline'].mean())}); top-{k} selection decided by a "
                   f"logit gap under 0.1 in {_fmt(s['near_tie_topk'].mean())} "
                   f"(baseline {_fmt(s['near_tie_topk_baseline'].mean())}).")
    out += _ablation_findings(abl, abl_sum)
    return out


def _ablation_findings(abl: pd.DataFrame | None, abl_sum: pd.DataFrame | None) -> list[str]:
    """Findings of the expert ablation: routing-tied experts against the domains they hurt, or
    (without domains) the experts whose removal hurts most."""
    out = []
    if abl_sum is not None and len(abl_sum):
        if "routing_expert_hurts_own_most" in abl_sum:
            ok = abl_sum.dropna(subset=["routing_expert_hurts_own_most"])
            n_ok = int(ok["routing_expert_hurts_own_most"].astype(bool).sum())
            own, other = ok["routing_expert_delta"], ok["routing_expert_delta_other"]
            out.append(f"Ablation: for {n_ok} of {len(ok)} (layer, domain) pairs, removing the "
                       f"expert routing ties most to the domain (highest lift) hurts that domain "
                       f"more than any other domain, and for {int((own > other).sum())} of "
                       f"{len(ok)} more than the other domains' mean (on average "
                       f"{own.mean():+.3f} nats/token on its own domain vs {other.mean():+.3f} on "
                       f"the others).")
        top = abl_sum.sort_values("specificity", ascending=False).head(3)
        out.append("Most domain-specific ablations: " + ", ".join(
            f"L{int(r.layer)}E{int(r.most_hurting_expert)} on {r.domain} ({r.delta:+.3f} nats "
            f"vs {r.delta_other_domains:+.3f} on other domains)" for r in top.itertuples()) + ".")
    elif abl is not None and len(abl):
        a = abl[abl["domain"] == "all"].sort_values("delta", ascending=False).head(3)
        out.append("Experts whose removal hurts most: " + ", ".join(
            f"L{int(r.layer)}E{int(r.expert)} ({r.delta:+.3f} nats/token)"
            for r in a.itertuples()) + ".")
    return out


def _domain_figures(res: moe.MoEResult, names: list[str] | None, layers: list[int],
                    tables: dict[str, pd.DataFrame], figures: dict[str, Any]) -> None:
    """Domain tables, expert x domain heatmaps and the NMI bars (when the corpus has domains)."""
    from analyses.app import plots

    s = res.summary
    tables["moe_domain"] = res.domain
    tables["moe_experts"] = res.experts
    for layer in _heat_layers(layers):
        m = res.domain[res.domain["layer"] == layer].pivot(index="domain", columns="expert",
                                                           values="share")
        if names:
            m = m.reindex([n for n in names if n in m.index])
        m.index.name, m.columns.name = "domain", "expert"
        figures[f"moe_domain_l{layer}"] = plots.heatmap(
            m, title=f"Layer {layer}: share of each domain's top-k assignments per expert "
                     f"(uniform {1 / m.shape[1]:.3f})",
            cmap="viridis")
    nmi = s.melt(id_vars="layer", value_vars=["nmi_domain", "nmi_domain_baseline"],
                 var_name="measure", value_name="nmi")
    nmi["measure"] = nmi["measure"].map({"nmi_domain": "observed",
                                         "nmi_domain_baseline": "shuffled domains"})
    figures["moe_nmi_domain"] = plots.bars(
        nmi.assign(layer=nmi["layer"].astype(str)), "layer", "nmi", hue="measure",
        title="NMI(expert; domain) against the permutation baseline")


def _ablation(model: Any, opts: dict, abl_batches: Any, names: list[str] | None,
              res: moe.MoEResult, progress: Any, tables: dict[str, pd.DataFrame],
              figures: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Expert ablation, its summary against routing (with domains) and its heatmaps."""
    from analyses.app import plots

    abl_sum = None
    abl_layers = _ablation_layers(model, opts.get("ablation_layers"))
    abl = moe.expert_ablation(model, abl_batches, layers=abl_layers, domain_names=names,
                              max_tokens=int(opts.get("ablation_tokens")
                                             or DEFAULT_ABLATION_TOKENS),
                              progress=progress)
    tables["moe_ablation"] = abl
    if names:
        abl_sum = moe.ablation_summary(abl, res.experts)
        tables["moe_ablation_summary"] = abl_sum
        for layer in _heat_layers(abl_layers):
            m = abl[(abl["layer"] == layer) & (abl["domain"] != "all")].pivot(
                index="domain", columns="expert", values="delta")
            m = m.reindex([n for n in names if n in m.index])
            m.index.name, m.columns.name = "domain", "expert"
            figures[f"moe_ablation_l{layer}"] = plots.heatmap(
                m, title=f"Layer {layer}: loss change (nats/token) per domain when one expert "
                         f"is masked",
                cmap="RdBu_r", center=0, fmt=".2f")
    return abl, abl_sum


def build(model: Any, opts: dict, progress: Any) -> Section:
    """The MoE section for ``model`` (see :mod:`analyses.moe`)."""
    from analyses.app import plots

    moe.moe_layers(model)  # a dense model: one clear line
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    seed = int(opts.get("seed") or 0)
    batches, abl_batches, names, data = _corpus(model, opts)
    t0 = time.perf_counter()
    res = moe.routing_stats(model, batches, domain_names=names,
                            n_perm=int(opts.get("n_perm") or 200),
                            min_token_count=int(opts.get("min_token_count") or 5), seed=seed,
                            progress=progress)
    timings["routing"] = time.perf_counter() - t0
    s = res.summary
    tables: dict[str, pd.DataFrame] = {"moe_summary": s, "moe_load": res.load}
    figures: dict[str, Any] = {}
    layers = [int(x) for x in s["layer"]]
    uniform = 1 / int(s["n_experts"].iloc[0])
    figures["moe_load"] = plots.bars(
        res.load.assign(layer=res.load["layer"].astype(str)), "expert", "share_topk",
        hue="layer" if len(layers) <= 8 else None,
        title=f"Top-{int(s['top_k'].iloc[0])} load per expert (uniform = {uniform:.3f})",
        ylabel="share of top-k assignments")
    figures["moe_load"].axes[0].axhline(uniform, ls="--", color="gray", lw=1)
    if len(res.domain):
        _domain_figures(res, names, layers, tables, figures)
    tables["moe_tokens"] = (res.tokens.sort_values(["layer", "count"], ascending=[True, False])
                            .groupby("layer", sort=True).head(200).reset_index(drop=True))
    if len(res.cross_layer):
        tables["moe_cross_layer"] = res.cross_layer
    abl = abl_sum = None
    cfg = model.cfg
    if (cfg.architecture == "decoder" and not opts.get("no_ablation")
            and cfg.experts_per_token < cfg.n_experts):
        t0 = time.perf_counter()
        abl, abl_sum = _ablation(model, opts, abl_batches, names, res, progress, tables, figures)
        timings["ablation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    notes = []
    abl_note = None
    if abl is None:
        abl_note = ("Expert ablation not run: " + (
            "it measures next-token loss and this model is an encoder."
            if cfg.architecture != "decoder" else "--no-ablation." if opts.get("no_ablation")
            else "every expert is always chosen (top-k = number of experts)."))
    if cfg.architecture != "decoder":
        notes.append("Expert ablation is skipped: it measures next-token loss, and this model is "
                     "an encoder.")
    if not names:
        notes.append("The corpus has no domain labels, so there are no domain statistics.")
    shown = [c for c in ["layer", "nmi_domain", "nmi_domain_baseline", "p_value", "nmi_token",
                         "nmi_token_baseline", "consecutive_same_top1", "consecutive_random",
                         "cv_topk", "router_entropy"] if c in s]
    tables["moe_summary"] = s[shown + [c for c in s.columns if c not in shown]]
    tables["moe_overview"] = s[shown]  # the inline view; moe_summary.csv has every column
    return Section(
        key="moe",
        title="MoE expert specialisation",
        method=METHOD + (" " + " ".join(notes) if notes else ""),
        source=SOURCE,
        data=data + f" {int(opts.get('n_perm') or 200)} permutation tables per test, seed {seed}.",
        findings=_findings(res, abl, abl_sum, int(opts.get("min_token_count") or 5)),
        tables=tables,
        figures=figures,
        show_tables={"moe_overview": 32,
                     **({"moe_ablation_summary": 20} if abl_sum is not None else {})},
        timings=timings,
        summary=moe_summary(s, tables.get("moe_experts"), abl, abl_sum, abl_note),
        summary_figure=_summary_figure(s, figures),
    )


def _summary_figure(s: pd.DataFrame, figures: dict[str, Any]) -> str:
    """The domain heatmap of the most domain-specialised layer when drawn, else the load."""
    if "nmi_domain" in s and s["nmi_domain"].notna().any():
        name = f"moe_domain_l{int(s.loc[s['nmi_domain'].idxmax(), 'layer'])}"
        if name in figures:
            return name
    return "moe_load"


register("moe", title="MoE expert specialisation", build=build, applies=is_moe,
         default_model=SHIPPED_MODEL, order=40)


@cli.command("moe")
@model_argument()
@click.option("--text", "texts", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Text file to route, repeatable: each file is one domain (named by its stem).")
@click.option("--domains", default=None, metavar="TASK",
              help="Stream the 'domains' training task (or a .pt checkpoint trained on it) with "
                   "per-token labels [default for models trained on it].")
@click.option("--seq-len", type=click.IntRange(min=2), default=DEFAULT_SEQ_LEN, show_default=True,
              help="Tokens per sequence for --text.")
@click.option("--n-perm", type=click.IntRange(min=0), default=200, show_default=True,
              help="Permutation tables per test (p-values resolve to 1/(n+1)).")
@click.option("--min-token-count", type=click.IntRange(min=1), default=5, show_default=True,
              help="Tokens seen fewer times are left out of the token statistics.")
@click.option("--no-ablation", is_flag=True, help="Skip expert ablation.")
@click.option("--ablation-tokens", type=click.IntRange(min=2), default=DEFAULT_ABLATION_TOKENS,
              show_default=True,
              help="Tokens in the ablation corpus (re-run once per expert).")
@click.option("--ablation-layers", default=None, metavar="L,L,...",
              help=f"MoE layers to ablate [default: all when layers x experts <= "
                   f"{MAX_ABLATION_JOBS}, else 4 spread layers].")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def moe_cmd(ctx: click.Context, model: str, texts: tuple[Path, ...], domains: str | None,
            seq_len: int, n_perm: int, min_token_count: int, no_ablation: bool,
            ablation_tokens: int, ablation_layers: str | None, svg: bool, out: Path | None,
            batch_size: int, max_tokens: int | None, device: str, dtype: str, seed: int,
            quiet: bool, force: bool) -> None:
    """MoE expert specialisation of MODEL: load, expert x domain and expert x token mutual
    information against permutation baselines, consecutive-token and cross-layer routing,
    router margins, expert ablation per domain (Mixtral sec. 5; OpenMoE sec. 4).

    Writes data/moe_summary.csv, moe_load.csv, moe_domain.csv, moe_experts.csv,
    moe_ablation.csv and heatmaps. A dense model is refused with one line. Your own text
    goes in with one --text FILE per domain, on a model whose tokenizer reads it (a Hugging
    Face Mixtral, Qwen2-MoE or OLMoE folder; the shipped domains model knows only its task's
    words).

    \b
    Example:
      interp moe interp/data/domains_moe.pt --out reports/moe
      interp moe interp/data/domains_moe.pt --domains domains --max-tokens 65536 \\
          --out reports/moe_big
    """
    for p in texts:
        if not p.is_file():
            raise CliError(f"text file not found: {p}")
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    opts = {"model_source": model, "batch_size": batch_size, "max_tokens": max_tokens,
            "device": device, "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg,
            "texts": list(texts), "domains": domains, "seq_len": seq_len, "n_perm": n_perm,
            "min_token_count": min_token_count, "no_ablation": no_ablation,
            "ablation_tokens": ablation_tokens, "ablation_layers": ablation_layers}
    section = build(m, opts, progress_for(quiet))
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed, ctx=ctx,
                 svg=svg, quiet=quiet, title=f"interp moe: {model}")
