"""``interp memory MODEL``: which heads read a memory-augmented model's memory, what they
retrieve, and what ablating their memory access costs (see :mod:`analyses.memory`)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import pandas as pd

from analyses.app import plots
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
from interp.errors import InterpError
from interp.progress import progress_bar

METHOD = """\
Held-out documents of the `retrieval` task are fed segment by segment through `model.memory`;
the last segment (whose queries need a value given in the first) is run with the memory frozen.
**Memory share**: per head, the attention mass on memory entries (`hook_mem_pattern`, one
softmax with the context for persistent, XL and joint kNN memory) or a gated kNN head's gate
(`hook_mem_gate`),
at the query positions and over all positions. **Retrieval**: memory entries are mapped back to
the document positions they hold (a compressed state to the tokens pooled into it); a head
*retrieves* when its top entry holds the answer's position for at least half of the queries, or
when cutting its memory access alone costs half of the accuracy above chance. **Ablation**: a
head's memory access is cut (a gated kNN head's gate 0; or its memory scores set to the
minimum, so the softmax renormalises over the context), one head at a time, then the retrieving
heads together, then every memory head; accuracy is compared with the intact model, the memory
reset, and chance."""
SOURCE = """\
Sukhbaatar et al. 2019, *Augmenting Self-attention with Persistent Memory*. Wu et al. 2022,
*Memorizing Transformers*. Tworkowski et al. 2023, *Focused Transformer* (retrieved entries in
one softmax with the context). Dai et al. 2019, *Transformer-XL*. Rae et al. 2020, *Compressive
Transformers for Long-Range Sequence Modelling*. Olsson et al. 2022, *In-context Learning and
Induction Heads* (the match-and-copy mechanism the task plants)."""


def _findings(res: object) -> list[str]:
    acc = res.accuracy.set_index("condition").accuracy
    heads = res.heads
    named = ", ".join(f"L{la}H{h}" for la, h in res.retrieving_heads) or "none"
    out = [f"Accuracy at the queries: {acc['memory intact']:.1%} with memory, "
           f"{acc['memory reset (last segment alone)']:.1%} with the memory reset "
           f"(chance {acc['chance (1 / n_values)']:.1%})."]
    cut = acc["retrieving heads' memory ablated"]
    out.append(f"Retrieving heads: {named}; cutting their memory access gives {cut:.1%}, "
               f"every memory head {acc['every memory head ablated']:.1%}.")
    if not heads.empty:
        top = heads.sort_values("acc_drop", ascending=False).iloc[0]
        out.append(f"Largest single-head drop: L{int(top['layer'])}H{int(top['head'])}, "
                   f"{top.acc_drop:+.1%} (memory share at queries {top.memory_share_query:.2f}, "
                   f"top entry = answer for {top.top1_target:.0%} of queries).")
    return out


def build(model: object, opts: dict, progress: object) -> Section:
    """The memory section of one model."""
    from analyses.memory import analyse_memory

    t0 = time.perf_counter()
    try:
        res = analyse_memory(model, n_docs=opts.get("n_docs", 256),
                             batch_size=opts.get("batch_size", 64),
                             seed=opts.get("seed", 0) + 12345, progress=progress)
    except InterpError as e:
        raise CliError(str(e)) from None
    heads = res.heads.assign(head_name=[f"L{a}H{b}" for a, b in
                                        zip(res.heads["layer"], res.heads["head"], strict=True)])
    long = pd.concat([heads.assign(measure="memory share at queries",
                                   value=heads.memory_share_query),
                      heads.assign(measure="accuracy drop when ablated", value=heads.acc_drop)])
    findings = _findings(res)
    figures = {"memory_heads": plots.bars(long, "head_name", "value", hue="measure",
                                          title="Memory use and ablation effect per head",
                                          xlabel="head", ylabel="share / accuracy drop")}
    tables = {"memory_heads": res.heads, "memory_accuracy": res.accuracy}
    if not res.retrieved.empty:
        tables["memory_retrieved"] = res.retrieved
    return Section(
        key="memory", title="Memory-augmented attention", method=METHOD, source=SOURCE,
        data="The `retrieval` training task's held-out documents (generated, seeded).",
        findings=findings, tables=tables, figures=figures,
        show_tables={"memory_accuracy": 10, "memory_heads": 32, "memory_retrieved": 24},
        timings={"memory": time.perf_counter() - t0}, summary=findings,
        summary_figure="memory_heads")


def applies(model: object) -> bool:
    return getattr(model, "memory", None) is not None


register("memory", title="Memory-augmented attention", build=build, applies=applies, order=60)


@cli.command("memory")
@model_argument(default="interp/data/retrieval_knn.pt")
@click.option("--n-docs", type=click.IntRange(min=1), default=256, show_default=True,
              help="Held-out documents (each with the task's queries).")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def memory_cmd(ctx: click.Context, model: str, n_docs: int, svg: bool, out: Path | None,
               batch_size: int, max_tokens: int | None, device: str, dtype: str, seed: int,
               quiet: bool, force: bool) -> None:
    """Memory report of MODEL (a memory model trained on the `retrieval` task): memory share
    per head, the entries the retrieving heads read, and the accuracy when each head's memory
    access is cut (Wu et al. 2022; Dai et al. 2019; Rae et al. 2020).

    Writes data/memory_heads.csv, memory_accuracy.csv, memory_retrieved.csv and a figure.

    \b
    Example:
      interp memory interp/data/retrieval_knn.pt --out reports/memory_knn
      interp memory interp/data/retrieval_knn.pt --n-docs 64 --out reports/memory_small
    """
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    opts = {"n_docs": n_docs, "batch_size": batch_size, "seed": seed}
    section = build(m, opts, progress_bar(quiet))
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, svg=svg, quiet=quiet, title=f"interp memory: {model}")
