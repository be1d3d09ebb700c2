"""Peak memory of activation and attribution patching on N and on 10N prompt pairs (issue 23).

Each measurement is its own fresh interpreter whose peak resident memory is read from
``getrusage(RUSAGE_CHILDREN)`` by a wrapper after it exits (as :mod:`bench.activations_memory`).
The claim: the methods stream pairs in batches and keep per-site running sums, so 10x the
pairs costs ~10x the time and the same memory. For scale, the bytes that materialising every
pair's activations would take (clean, corrupted and, for attribution, gradients of every
patched hook) are printed beside each peak.

    python -m bench.patching_memory --json docs/bench_patching.json

Model: a random 4-layer decoder (d_model 128, 4 heads, RoPE, vocabulary 512) on random pairs
of 48 tokens that differ from position 24 on (so half the prompt is a shared prefix);
``--models random,smollm2`` adds SmolLM2-135M on IOI pairs: attribution patching of every
head on 100 and 1000 pairs, activation patching of the upper 6 layers' heads on 10 and 100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
MODEL = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_vocab": 512, "n_ctx": 64,
         "positional": "rope", "norm": "rmsnorm", "act": "swiglu"}
SEQ, DIFF_AT = 48, 24

# One measured run: build the model and pairs, run the method, print seconds and the table
# size. Arguments: method, model spec (a JSON config path or "smollm2-135m"), pairs, what.
CHILD = r"""
import json, sys, time, torch
import interp
from analyses.circuits.attribution import attribution_patching
from analyses.circuits.patching import activation_patching
from analyses.circuits.pairs import PromptPairs
method, spec, n, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
if spec.endswith(".json"):
    model = interp.HookedTransformer(interp.ModelConfig(**json.load(open(spec)))).eval()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 512, (n, __SEQ__), generator=g)
    corr = clean.clone()
    corr[:, __AT__:] = torch.randint(0, 512, (n, __SEQ__ - __AT__), generator=g)
    pairs = PromptPairs(tuple(clean), tuple(corr), torch.randint(0, 512, (n,), generator=g),
                        torch.randint(0, 512, (n,), generator=g))
    layers = None
else:
    from analyses.circuits.ioi import ioi_pairs
    model = interp.load_pretrained(spec)
    pairs = ioi_pairs(model, n)
    layers = list(range(24, model.cfg.n_layers)) if method == "activation" else None
t = time.perf_counter()
fn = activation_patching if method == "activation" else attribution_patching
df = fn(model, pairs, what, layers=layers, batch_size=16)
print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "rows": len(df),
                  "clean": df.attrs["clean"], "corrupted": df.attrs["corrupted"]}))
""".replace("__SEQ__", str(SEQ)).replace("__AT__", str(DIFF_AT))


def _child(args: list[str]) -> tuple[int, dict]:
    """(the run's peak RSS in MB, what it printed). The run is the only child of a fresh
    wrapper interpreter, so the wrapper's RUSAGE_CHILDREN peak is the run's own."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
               "capture_output=True, text=True); sys.stderr.write(r.stderr[-2000:]); "
               "print(r.stdout.strip()); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-c", CHILD, *args],
                         capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]) // 1024, json.loads(lines[-2])


def _materialised_mb(method: str, n: int, per_pair: int) -> float:
    """MB that holding every pair's activations of the patched hooks would take."""
    copies = 3 if method == "attribution" else 2  # clean, corrupted (+ gradients)
    return round(copies * n * per_pair * 4 / 1e6, 1)


def run(n: int, work: Path, models: list[str]) -> list[dict]:
    spec = work / "model.json"
    spec.write_text(json.dumps(MODEL))
    # hook_z of every layer: [pos, head, d_head] = SEQ * d_model floats per layer and pair
    jobs = []
    if "random" in models:
        per_pair = MODEL["n_layers"] * SEQ * MODEL["d_model"]
        jobs += [("attribution", str(spec), n, "head", per_pair),
                 ("activation", str(spec), n, "head", per_pair)]
    if "smollm2" in models:
        jobs += [("attribution", "smollm2-135m", 100, "head", 30 * 16 * 576),
                 ("activation", "smollm2-135m", 10, "head", 6 * 16 * 576)]
    rows = []
    for method, model, base, what, per_pair in jobs:
        for scale in (1, 10):
            t = time.perf_counter()
            peak, said = _child([method, model, str(base * scale), what])
            rows.append({"model": Path(model).stem if model.endswith(".json") else model,
                         "method": method, "what": what, "pairs": base * scale,
                         "seconds": said["seconds"], "wall_s": round(time.perf_counter() - t, 1),
                         "peak_rss_mb": peak, "rows": said["rows"],
                         "if_materialised_mb": _materialised_mb(method, base * scale, per_pair)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="N, the smaller pair count")
    parser.add_argument("--models", default="random",
                        help="comma-separated: random (the 4-layer model), smollm2 (IOI)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="interp_bench_patch_") as tmp:
        rows = run(args.pairs, Path(tmp), args.models.split(","))
    info = {"machine": f"{os.cpu_count()} CPUs", "model": MODEL, "seq_len": SEQ,
            "first_difference": DIFF_AT, "rows": rows}
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
