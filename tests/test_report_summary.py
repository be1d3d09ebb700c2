"""Every report opens with a summary (issue 18): findings with numbers, then one figure.

For every report type (``interp heads``, ``heads --compare``, ``masking``, ``moe``, ``ffn``,
``plot``, ``patch``, ``sae``, ``steer`` and the combined ``interp report``), run on the small
shipped models with small sizes: the first heading after the title is the summary, it holds
at least one number and a figure that exists on disk, in ``index.md`` and in ``index.html``;
and the numbers in each summary are the ones in the CSVs the same report writes, so the two
cannot drift apart.
The unit tests at the top cover the degenerate cases without a model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from analyses.app import plots
from analyses.app.cli import cli
from analyses.app.report import Report, ReportError, Section
from analyses.app.summary import report_summary, section_summary

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "interp" / "data"


# --------------------------------------------------------------------------- helpers


def summary_block(md: str) -> str:
    """The report summary of an index.md, checked to be the first heading after the title."""
    lines = md.splitlines()
    assert lines[0].startswith("# ")
    first_heading = next(line for line in lines[1:] if line.startswith("#"))
    assert first_heading == "## Summary", first_heading
    start = md.index("## Summary")
    return md[start:md.index("- **model:**", start)]


def check_report(out: Path) -> str:
    """The checks every report type passes; returns the Markdown summary block."""
    md = (out / "index.md").read_text()
    block = summary_block(md)
    items = [line[2:] for line in block.splitlines() if line.startswith("- ")]
    assert 1 <= len(items) <= 12, items
    assert re.search(r"\d", " ".join(items)), block
    figs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", block)
    assert figs and all((out / f).is_file() for f in figs), block
    html = (out / "index.html").read_text()
    body = html[html.index("</h1>"):]
    assert re.match(r'</h1>\s*<h2 class="summary">Summary</h2>', body), body[:200]
    head = body[:body.index('<table class="meta">')]
    assert re.search(r"<li>(?:(?!</li>).)*\d", head)
    assert "data:image/png;base64," in head and f"({figs[0]})" in head
    # a report of several sections gives each one its own summary, first
    sections = re.split(r"^## ", md[md.index("- **model:**"):], flags=re.M)[1:]
    if len([s for s in sections if not s.startswith("Contents")]) > 1:
        for s in sections:
            if not s.startswith("Contents"):
                assert re.search(r"^### (\w+)", s, re.M).group(1) == "Summary", s[:200]
    return block


def items_of(block: str) -> list[str]:
    return [line[2:] for line in block.splitlines() if line.startswith("- ")]


def invoke(*args: object) -> None:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output


def csv(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "data" / f"{name}.csv")


def g3(x: float) -> str:
    return f"{float(x):.3g}"


# --------------------------------------------------------------------------- no model


def _section(key: str, summary: list[str] | None = None, figure: bool = True) -> Section:
    df = pd.DataFrame({"layer": [0, 1], "head": [0, 0], "label": ["sink", "induction"],
                       "confidence": [0.5, 0.9]})
    return Section(key=key, title=f"Section {key}", method="m", source="s", data="d",
                   findings=["finding one 1", "finding two 2", "three 3", "four 4"],
                   tables={key: df},
                   figures={f"{key}_map": plots.label_map(df)} if figure else {},
                   summary=summary or [], summary_figure=f"{key}_map" if figure else None)


def test_fallback_is_first_findings_and_figure() -> None:
    s = _section("a")
    s.summary_figure = None
    assert section_summary(s) == (["finding one 1", "finding two 2", "three 3"], "a_map")
    assert section_summary(_section("b", figure=False))[1] is None


def test_combined_summary_leads_each_section_and_notes() -> None:
    items, fig = report_summary([_section("model", ["22 params", "3 hooks"]),
                                 _section("heads", ["8 heads", "L0H0 next"])],
                                notes=["MoE (`moe`): not run, it does not apply to x."])
    assert items == ["**Section model**: 22 params. 3 hooks.",
                     "**Section heads**: 8 heads. L0H0 next.",
                     "MoE (`moe`): not run, it does not apply to x."]
    assert fig == "heads_map"  # the analysis' figure, not the overview's


def test_unknown_summary_figure_rejected() -> None:
    s = _section("a", ["1"])
    s.summary_figure = "nope"
    report = Report("t", model_source="m", model_config={}, seed=0, command="interp x")
    with pytest.raises(ReportError, match="nope"):
        report.add(s)


def test_heads_summary_says_when_nothing_passes() -> None:
    from analyses.app.sections.heads import _summary

    h = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "label": ["uniform", "unclassified"],
                      "positional_share": [0.4, 0.6], "positional_offset": [-1, 1],
                      "positional_n": [10, 10], "induction": [0.02, 0.05]})

    class Res:
        heads = h
        layers = pd.DataFrame({"layer": [0], "sink_first": [0.3]})
        best_syntax = pd.DataFrame({"accuracy": [np.nan]})
        info = {"thresholds": {"positional": 0.9}}

    out = _summary(Res())  # type: ignore[arg-type]
    assert out[0] == "2 heads: 1 uniform, 1 unclassified."
    assert out[1].startswith("No positional head") and "60%" in out[1]
    assert out[2] == "No induction head: the strongest prefix matching is L0H1 at 0.05."


def test_masking_summary_says_why_heads_were_not_masked() -> None:
    from analyses.app.sections._summaries import masking_summary

    table = pd.DataFrame({"strategy": ["baseline", "bidirectional", "soft"],
                          "label": ["baseline", "bidirectional", "soft:4"],
                          "hidden_cos_delta": [0.0, 0.2, 0.01], "mean_js": [0, 0.3, 0.1]})
    out = masking_summary({"mask_strategies": table}, {}, False, "Head masking not run: x.")
    assert out[0] == ("Largest effect of 2 mask strategies: bidirectional (1 - cosine 0.2, mean "
                      "JS 0.3 bits).")
    assert out[-1] == "Head masking not run: x."


# --------------------------------------------------------------------------- every report type


def test_heads_report(tmp_path: Path) -> None:
    out = tmp_path / "heads"
    invoke("heads", DATA / "induction.pt", "--n-random", 4, "--half-len", 8, "--out", out, "-q")
    items = items_of(check_report(out))
    h = csv(out, "heads")
    counts = h["label"].value_counts()
    n, first = re.match(r"(\d+) heads: (.*)\.$", items[0]).groups()
    assert int(n) == len(h)
    for count, label in re.findall(r"(\d+) ([\w:-]+)", first):
        if label != "other":
            assert counts[label] == int(count)
    checked = 0
    for item in items:
        for m in re.finditer(r"(L(\d+)H(\d+)) is a (\S+) head: its most-attended key is at "
                             r"offset ([+-]\d+) for (\d+)% of (\d+) queries", item):
            r = h[(h["layer"] == int(m[2])) & (h["head"] == int(m[3]))].iloc[0]
            assert r["label"] == m[4] and int(r["positional_offset"]) == int(m[5])
            assert f"{r['positional_share']:.0%}" == f"{m[6]}%"
            assert int(r["positional_n"]) == int(m[7])
            checked += 1
        m = re.search(r"strongest prefix matching is L(\d+)H(\d+) at ([\d.]*\d)", item)
        if m:
            checked += 1
            assert f"{h['induction'].max():.2f}" == m[3]
            assert h.loc[h["induction"].idxmax(), ["layer", "head"]].tolist() == [int(m[1]),
                                                                                   int(m[2])]
    assert checked == 2  # this model has a previous-token head and, at this size, no induction


def test_heads_compare_report(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    invoke("heads", DATA / "induction_rope.pt", "--compare", DATA / "induction_alibi.pt",
           "--n-random", 4, "--half-len", 8, "--out", out, "-q")
    md = (out / "index.md").read_text()
    check_report(out)
    s = csv(out, "heads_compare_summary")
    compare = md[md.index("## Head taxonomies side by side"):]
    block = compare[compare.index("### Summary"):compare.index("### Method")]
    for r, item in zip(s.itertuples(), items_of(block), strict=True):
        assert item.startswith(f"{r.model} ({r.positional_encoding}): strongest induction head "
                               f"{r.best_induction_head} {r.induction:.2f}, previous-token "
                               f"{r.best_prev_token_head} {r.prev_token:.2f}")


def test_plot_report(tmp_path: Path) -> None:
    out = tmp_path / "plot"
    invoke("plot", DATA / "induction.pt", "--text", "t1 t2 t3 t1 t2 t3", "--out", out, "-q")
    items = items_of(check_report(out))
    p = csv(out, "patterns")
    top = p.loc[p["weight"].idxmax()]
    assert items[0].startswith(f"Strongest weight: L{top['layer']}H{top['head']}, query "
                               f"{top['q']} ")
    assert items[0].endswith(f"puts {top['weight']:.2f} on key {top['k']} {top['k_token']!r}.")


@pytest.mark.slow
def test_masking_report(tmp_path: Path) -> None:
    out = tmp_path / "mask"
    invoke("masking", DATA / "induction.pt", "--strategy", "bidirectional", "--strategy",
           "sliding_window:2", "--seq-len", 16, "--max-tokens", 64, "--pruning-steps", 2,
           "--random-orders", 1, "--out", out, "-q")
    items = items_of(check_report(out))
    t = csv(out, "mask_strategies")
    t = t[t["strategy"] != "baseline"]
    big = t.loc[t["kl"].idxmax()]
    assert items[0].startswith(f"Largest effect of {len(t)} mask strategies: {big['label']} "
                               f"(output KL {g3(big['kl'])}, mean JS {g3(big['mean_js'])} bits)")
    imp = csv(out, "head_importance")
    worst = imp.loc[imp["ablation_delta"].idxmax()]
    m = re.search(r"(\d+) of (\d+) heads can be removed.*removing L(\d+)H(\d+) alone changes it "
                  r"by ([+-][\d.]+)", " ".join(items))
    assert int(m[2]) == len(imp)
    assert [int(m[3]), int(m[4])] == [int(worst["layer"]), int(worst["head"])]
    assert m[5] == f"{worst['ablation_delta']:+.3f}"
    curve = csv(out, "pruning_curve")
    assert 0 <= int(m[1]) <= curve["n_removed"].max()


@pytest.mark.slow
def test_moe_report(tmp_path: Path) -> None:
    out = tmp_path / "moe"
    invoke("moe", DATA / "domains_moe.pt", "--n-perm", 9, "--ablation-tokens", 128,
           "--max-tokens", 1024, "--out", out, "-q")
    items = items_of(check_report(out))
    s = csv(out, "moe_summary")
    assert items[0].startswith(f"{int(s['n_experts'][0])} experts, top-{int(s['top_k'][0])}, "
                               f"{int(s['n_tokens'][0])} tokens per layer")
    assert f"up to {g3(s['cv_topk'].max())} (random assignment {g3(s['cv_random'][0])})" \
        in items[0]
    b = s.loc[s["nmi_domain"].idxmax()]
    assert (f"NMI(expert; domain) {g3(b['nmi_domain'])} in layer {int(b['layer'])} vs "
            f"{g3(b['nmi_domain_baseline'])}") in items[1]
    # p = 0.1 is the smallest a 9-permutation test can give: no claim of specialisation
    assert items[1].startswith("No domain specialisation at p <= 0.01")
    a = csv(out, "moe_ablation_summary").sort_values("specificity", ascending=False).iloc[0]
    assert items[-1] == (f"Masking L{int(a['layer'])}E{int(a['most_hurting_expert'])} costs "
                         f"{a['domain']} {a['delta']:+.3f} nats/token vs "
                         f"{a['delta_other_domains']:+.3f} on the other domains.")


@pytest.mark.slow
def test_ffn_report(tmp_path: Path) -> None:
    out = tmp_path / "ffn"
    invoke("ffn", DATA / "knowledge.pt", "--max-facts", 2, "--samples", 2, "--ig-steps", 2,
           "--kv-layers", 0, "--top-k", 3, "--max-tokens", 256, "--out", out, "-q")
    items = items_of(check_report(out))
    f = csv(out, "ffn_facts")
    assert items[0] == (f"The model answers {int(f['known'].sum())} of {len(f)} facts (greedy "
                        "next token); 2 are analysed.")
    avg = csv(out, "ffn_trace_average")
    mlp = avg[(avg["corruption"] == "noise") & (avg["kind"] == "mlp")]
    b = mlp.loc[mlp["aie"].idxmax()]
    assert f"layer {int(b['layer'])} (AIE {g3(b['aie'])})" in items[1]


@pytest.mark.slow
def test_combined_report(tmp_path: Path) -> None:
    out = tmp_path / "all"
    invoke("report", DATA / "induction.pt", "--only", "heads", "--only", "moe",
           "--max-tokens", 512, "--out", out, "-q")
    block = check_report(out)
    items = items_of(block)
    assert items[0].startswith("**Model: interp/data/induction.pt**: ")
    assert items[1].startswith("**Head taxonomy: what each attention head does**: ")
    # the section skipped says why, in the summary
    assert items[-1] == ("MoE expert specialisation (`moe`): not run, it does not apply to "
                         "interp/data/induction.pt.")
    n_params = int(csv(out, "model_params")["parameters"].sum())
    assert f"{n_params:,} parameters" in items[0]
    md = (out / "index.md").read_text()
    heads = md[md.index("## Head taxonomy"):]
    lead = items_of(heads[heads.index("### Summary"):heads.index("### Method")])[:2]
    assert items[1].endswith(" ".join(lead))


# report types added after the summary work: the same first-heading, number and figure checks
@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("patch", DATA / "induction.pt", "--pairs", "8"),
    ("sae", DATA / "induction.pt", "--hook", "blocks.1.hook_resid_post", "--steps", "20"),
    ("steer", "smollm2-135m", "--coeffs=-2,0,2", "--max-new-tokens", "6"),
], ids=["patch", "sae", "steer"])
def test_later_report_types_open_with_a_summary(args: tuple, tmp_path: Path) -> None:
    out = tmp_path / str(args[0])
    invoke(*args, "--out", out, "-q")
    check_report(out)
