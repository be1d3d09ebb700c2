"""Peak memory of ``interp activations`` on a corpus and on 10x that corpus (issue 21).

Each run is its own process (``python -m analyses.app.cli activations ...``) whose peak
resident memory is read from ``getrusage(RUSAGE_CHILDREN)`` after it exits; then the store
is read back shard by shard (``ActivationStore.batches``, shuffled) in another process, also
measured. Flat peak memory with 10x the tokens (and 10x the bytes on disk) is the claim.

    python -m bench.activations_memory --json docs/bench_activations.json

Model: a random 4-layer decoder (d_model 256, 8 heads, byte tokens, n_ctx 128), saved as a
.json config; corpus: synthetic lines of text, one document per line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
HOOKS = "blocks.1.hook_resid_post,blocks.3.hook_resid_post"
MODEL = {"n_layers": 4, "d_model": 256, "n_heads": 8, "d_vocab": 256, "n_ctx": 128}
READ = ("import sys, interp; s = interp.ActivationStore(sys.argv[1]); "
        "print(sum(b['doc'].shape[0] for b in s.batches(4096, shuffle=True, seed=0)))")


def _corpus(path: Path, n_docs: int) -> None:
    rng = random.Random(0)
    words = ["the", "model", "reads", "a", "token", "layer", "head", "writes", "stream", "of"]
    with path.open("w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "\n")


def _child(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, the command's peak RSS in MB, its stdout). The command runs under a fresh
    wrapper interpreter whose only child it is, so the wrapper's RUSAGE_CHILDREN peak is the
    command's own (this process's RUSAGE_CHILDREN would keep the largest of all runs)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
               "capture_output=True, text=True); sys.stderr.write(r.stderr); "
               "print(r.stdout.strip()); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env=env, check=True)
    lines = out.stdout.strip().splitlines()
    return time.perf_counter() - t, int(lines[-1]) // 1024, "\n".join(lines[:-1])


def run(base_docs: int, work: Path) -> list[dict]:
    model = work / "model.json"
    model.write_text(json.dumps(MODEL))
    rows = []
    for scale in (1, 10):
        corpus = work / f"corpus_{scale}x.txt"
        _corpus(corpus, base_docs * scale)
        out = work / f"acts_{scale}x"
        secs, peak, said = _child([sys.executable, "-m", "analyses.app.cli", "activations",
                                   str(model), "--hooks", HOOKS, "--corpus", str(corpus),
                                   "--out", str(out), "--seq-len", "128",
                                   "--batch-tokens", "4096", "--shard-tokens", "8192",
                                   "--store-dtype", "float16", "--device", "cpu"])
        index = json.loads((out / "index.json").read_text())
        disk = sum(p.stat().st_size for p in out.iterdir())
        rsecs, rpeak, rsaid = _child([sys.executable, "-c", READ, str(out)])
        assert int(rsaid) == index["n_tokens"], (rsaid, index["n_tokens"])
        rows.append({"corpus": f"{scale}x", "documents": base_docs * scale,
                     "tokens": index["n_tokens"], "shards": len(index["shards"]),
                     "disk_mb": round(disk / 1e6, 1), "write_s": round(secs, 1),
                     "write_peak_rss_mb": peak, "read_s": round(rsecs, 1),
                     "read_peak_rss_mb": rpeak, "message": said.split(":")[0]})
        shutil.rmtree(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=60, help="documents in the 1x corpus")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="interp_bench_acts_") as tmp:
        rows = run(args.docs, Path(tmp))
    info = {"machine": f"{os.cpu_count()} CPUs", "model": MODEL, "hooks": HOOKS.split(","),
            "peak_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "rows": rows}
    text = json.dumps(info, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
