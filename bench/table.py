"""The printed table: one Markdown row per (model, workload), as BENCHMARKS.md quotes it.

Times in ms (long-context and streaming rows: seconds, MiB and tokens/s), interp's ratio to
plain transformers without hooks, and the target each ratio is held to. A peer that failed
(e.g. killed by the out-of-memory killer) is named in its cell instead of a ratio.
"""

from __future__ import annotations

from typing import Any

from bench.models import TOOLS

TARGETS = {
    "no_hooks": "<= 1.00",
    "attn_mlp": "<= 1.03",
    "patterns": "<= 1.05",
    "cache_all": "<= 1.20",
}


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one row per (model, workload), times in ms, ratios to plain
    transformers."""
    rows = [
        "| model | workload | transformers | transformer_lens | nnsight | interp "
        "| interp / transformers | targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for wl, by_model in result["workloads"].items():
        for model, e in by_model.items():
            if wl in TARGETS:
                rows += _timed_rows(model, wl, e)
            elif wl == "long_context":
                rows += _long_context_rows(model, e)
            elif wl == "streaming":
                rows += _streaming_rows(model, e)
    return "\n".join(rows)


def _timed_rows(model: str, wl: str, e: dict[str, Any]) -> list[str]:
    """A timed workload's row, and for ``no_hooks`` the per-call (1 x 8) row after it."""
    med = e["medians_s"]
    cells = [f"{med[t] * 1e3:.1f} ms" if t in med else "-" for t in TOOLS]
    ratio = e["ratio_vs_plain_transformers"].get("interp")
    shape = "x".join(map(str, e["shape"]))
    tail = f" | {ratio:.3f} | {TARGETS[wl]} |"
    rows = [f"| {model} | {wl} ({shape}) | " + " | ".join(cells) + tail]
    if wl == "no_hooks" and "per_call_1x8" in e:
        p = e["per_call_1x8"]
        cells = [f"{p['medians_s'][t] * 1e3:.2f} ms" if t in p["medians_s"] else "-" for t in TOOLS]
        r = p["ratio_vs_plain_transformers"].get("interp")
        nn = p["ratio_vs_plain_transformers"].get("nnsight")
        bound = f"<= nnsight ({nn:.3f})" if nn is not None else "<= nnsight"
        tail = f" | {r:.3f} | {bound} |"
        rows.append(f"| {model} | per call (1x8) | " + " | ".join(cells) + tail)
    return rows


def _long_context_rows(model: str, e: dict[str, Any]) -> list[str]:
    """Seconds and peak MiB per tool, without pattern hooks and with one layer's patterns."""

    def cell(t: str, k: str = "no_patterns") -> str:
        got = e.get(t) if isinstance(e.get(t), dict) else {}
        if k == "no_patterns" and "error" in got:
            return got["error"]
        v = got.get(k)
        return f"{v['seconds']:.2f} s, {v['peak_mib']:.0f} MiB" if v else "-"

    if "memory_ratio_interp_vs_transformer_lens" in e:
        mem = f"mem {e['memory_ratio_interp_vs_transformer_lens']:.2f} of TL"
    elif "error" in e.get("transformer_lens", {}):
        mem = "TL failed; interp ran"
    else:
        mem = "-"
    no_patterns = " | ".join(cell(t) for t in TOOLS)
    one_layer = " | ".join(cell(t, "one_layer_patterns") for t in TOOLS)
    return [
        f"| {model} | 1x4096, no patterns | {no_patterns} | {mem} | <= 0.25 of TL |",
        f"| {model} | 1x4096, one layer's patterns | {one_layer} | | |",
    ]


def _streaming_rows(model: str, e: dict[str, Any]) -> list[str]:
    """interp's tokens/s and peak MiB on the 1x and 10x corpus, and the 10x / 1x memory ratio."""
    s = e.get("interp", {})
    if "1x" not in s:
        return []
    one, ten = s["1x"], s["10x"]
    ratio = e.get("memory_ratio_10x_vs_1x", float("nan"))
    return [
        f"| {model} | head taxonomy stream | - | - | - | "
        f"1x: {one['tokens_per_s']:.0f} tok/s, {one['peak_mib']:.0f} MiB; "
        f"10x: {ten['tokens_per_s']:.0f} tok/s, {ten['peak_mib']:.0f} MiB | "
        f"mem 10x/1x {ratio:.2f} | <= 1.10 |"
    ]
