"""Time and summarise `interp ffn` on SmolLM2-135M (not a test: minutes of CPU).

Loads the packaged SmolLM2-135M-Instruct GGUF through ``interp.load_pretrained``, keeps the
shipped facts it knows, analyses ``--facts`` of them (causal tracing with noise and token
replacement, knowledge neurons, key-value memories, logit lens) and prints the wall time per
method and the headline numbers that notes/ffn.md quotes. ``--out DIR`` also writes the report.

# 14:44 on 2 cores (--samples 2):
OMP_NUM_THREADS=2 python scripts/bench_ffn_smollm2.py --facts 20 --threads 2 --out reports/ffn_smol
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

_T0 = time.perf_counter()


def _progress(iterable, desc: str = "", total: int | None = None):
    """Print one line per item to stderr (elapsed seconds, process CPU seconds)."""
    for i, item in enumerate(iterable):
        print(f"[{time.perf_counter() - _T0:7.0f}s wall {time.process_time():7.0f}s cpu] {desc} "
              f"{i + 1}/{total or '?'}", file=sys.stderr, flush=True)
        yield item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20, help="known facts to analyse")
    # 2 keeps 20 facts within 15 minutes on 2 cores (14:44 measured; 3, the CLI default: 17:46)
    ap.add_argument("--samples", type=int, default=2,
                    help="noise samples / replacement subjects per fact")
    ap.add_argument("--replacements", type=int, default=None,
                    help="replacement subjects per fact [default: --samples]")
    ap.add_argument("--positions", choices=["all", "roles"], default="roles")
    ap.add_argument("--ig-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the report folder here")
    ap.add_argument("--json", default=None, help="write the summary as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import interp
    from analyses import ffn as fk

    t0 = time.perf_counter()
    model = interp.load_pretrained("smollm2-135m").eval()
    t_load = time.perf_counter() - t0
    opts = {"model_source": "smollm2-135m", "max_facts": args.facts, "samples": args.samples,
            "replacements": args.replacements, "positions": args.positions,
            "ig_steps": args.ig_steps, "seed": args.seed, "batch_size": 8, "max_tokens": None}
    t1, c1 = time.perf_counter(), time.process_time()
    if args.out:
        from analyses.app.report import Report
        from analyses.app.sections.ffn import build

        res_holder: dict = {}
        orig = fk.analyse

        def keep(*a, **k):
            res_holder["res"] = orig(*a, **k)
            return res_holder["res"]

        fk.analyse = keep
        section = build(model, opts, _progress)
        fk.analyse = orig
        res = res_holder["res"]
        report = Report("interp ffn: smollm2-135m", model_source="smollm2-135m",
                        model_config=model.cfg.to_dict(), seed=args.seed,
                        command=["scripts/bench_ffn_smollm2.py"])
        report.add(section)
        report.write(args.out, force=True)
    else:
        res = fk.analyse(model, None, None, max_facts=args.facts, n_samples=args.samples,
                         n_replacements=args.replacements, positions=args.positions,
                         ig_steps=args.ig_steps, seed=args.seed, progress=_progress)
    total, cpu = time.perf_counter() - t1, time.process_time() - c1

    avg = res["trace_average"]
    import os

    summary = {"threads": args.threads, "load_s": round(t_load, 1), "analysis_s": round(total, 1),
               "analysis_cpu_s": round(cpu, 1), "load_average_1m": round(os.getloadavg()[0], 2),
               "timings_s": {k: round(v, 1) for k, v in res["timings"].items()},
               "n_facts": res["n_facts"], "n_known": res["n_known"],
               "n_analysed": len(res["facts"]), "window": res["window"]}
    for corruption in ("noise", "replace"):
        for kind in ("resid", "mlp", "attn", "mlp_single"):
            sub = avg[(avg["corruption"] == corruption) & (avg["kind"] == kind)]
            if sub.empty:
                continue
            best = sub.loc[sub["aie"].idxmax()]
            early = sub[sub["layer"] < model.cfg.n_layers // 2]
            summary[f"trace_{corruption}_{kind}"] = {
                "peak_role": str(best["role"]), "peak_layer": int(best["layer"]),
                "peak_aie": round(float(best["aie"]), 4),
                "early_subject_last_max": round(
                    float(early[early["role"] == "subject_last"]["aie"].max()), 4),
                "early_last_max": round(float(early[early["role"] == "last"]["aie"].max()), 4)}
    summary["edits"] = res["edit_summary"].round(4).to_dict("records")
    kn = res["knowledge_neurons"]
    by_layer = kn[kn["kept"]]["layer"].value_counts().sort_index().items()
    summary["knowledge_neurons"] = {"refined": int(len(kn)), "kept": int(kn["kept"].sum()),
                                    "kept_by_layer": {int(k): int(v) for k, v in by_layer}}
    ll = res["logit_lens"]
    summary["logit_lens"] = {int(layer): {"p": round(float(g["answer_prob"].mean()), 4),
                                          "top1": round(float((g["answer_rank"] == 1).mean()), 3),
                                          "kl": round(float(g["kl_to_final"].mean()), 3)}
                             for layer, g in ll.groupby("layer")}
    summary["kv_agreement"] = res["kv_agreement"].round(4).to_dict("records")
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
