"""``interp ffn`` in float32 and with bfloat16 products: wall time, CPU time and the largest
difference of every reported number (issue 21's "same numbers, +-0.01 on every effect").

Runs the CLI twice in fresh processes (``--products float32``, then ``--products bfloat16``),
reads each ``run.json``'s per-method timings and compares every CSV the two reports write,
column by column. Not a test (minutes of CPU on SmolLM2); BENCHMARKS.md "FFN throughput"
quotes it::

    python -m bench.ffn_products smollm2-135m --out /tmp/ffn_products
    python -m bench.ffn_products --compare A B   # two existing report folders only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

#: Columns that are effects or probabilities: the +-0.01 the issue allows applies to these.
EFFECT_COLUMNS = ("clean_prob", "corrupt_prob", "restored_prob", "indirect_effect", "aie",
                  "mean_rel_change", "mean_abs_rel_change", "rel_change", "p_before", "p_after",
                  "answer_prob", "top_prob", "kl_to_final", "agreement_top1", "baseline_top1",
                  "agreement_any", "baseline_any")


def compare(a: Path, b: Path) -> list[dict]:
    """Per CSV of report ``a``: rows, whether text columns agree, and the largest absolute
    difference of each numeric column against report ``b``."""
    out = []
    for f in sorted((a / "data").glob("*.csv")):
        x, y = pd.read_csv(f), pd.read_csv(b / "data" / f.name)
        row = {"table": f.stem, "rows": len(x), "rows_other": len(y)}
        if x.shape == y.shape:
            text = [c for c in x.columns if x[c].dtype == object]
            row["text_equal"] = all((x[c].fillna("") == y[c].fillna("")).all() for c in text)
            row["max_abs_diff"] = {c: float((x[c].astype(float) - y[c].astype(float)).abs().max())
                                   for c in x.columns
                                   if x[c].dtype.kind in "fib" and y[c].dtype.kind in "fib"}
        out.append(row)
    return out


def _run(model: str, products: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "analyses.app.cli", "ffn", model, "--products", products,
           "--out", str(out), "--force", "-q", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timings = json.loads((out / "run.json").read_text())["timings"]["ffn"]
    return {"products": products, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "stages_s": {k: round(v, 1) for k, v in timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ffn_products"))
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--only", choices=["float32", "bfloat16"], default=None,
                    help="time one precision only")
    args, extra = ap.parse_known_args()
    if args.compare:
        print(json.dumps(compare(*args.compare), indent=1))
        return
    runs = [_run(args.model, p, args.out / p, extra)
            for p in ("float32", "bfloat16") if args.only in (None, p)]
    print(json.dumps(runs, indent=1))
    if args.only is None:
        rows = compare(args.out / "float32", args.out / "bfloat16")
        worst = {r["table"]: max((v for k, v in r.get("max_abs_diff", {}).items()
                                  if k in EFFECT_COLUMNS), default=0.0) for r in rows}
        print(json.dumps({"tables": rows, "largest_effect_difference": worst}, indent=1))


if __name__ == "__main__":
    main()
