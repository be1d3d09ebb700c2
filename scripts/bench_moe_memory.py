"""Memory of the streamed MoE analysis when the corpus grows tenfold (issue 8, "memory flat").

Each corpus size runs in its own fresh process (peak RSS is per process), on the same model:
a random MoE decoder with a 4096-token vocabulary (so the token x expert table is exercised),
or any MODEL that ``interp.load_pretrained`` reads. Tokens are Zipf-distributed with a domain
label per sequence. Reported per size: wall time, peak RSS, RSS growth during the run (peak
minus RSS after a warm-up batch), and the bytes held by the accumulators.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_moe_memory.py --tokens 200000 --factor 10
    python scripts/bench_moe_memory.py --model interp/data/domains_moe.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm(batches, n: int):
    it = batches()
    for _ in range(n):
        item = next(it, None)
        if item is None:
            return
        yield item


def child(n_tokens: int, model_src: str | None, batch: int, seq: int, n_perm: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import interp
    from analyses import moe

    if model_src:
        model = interp.load_pretrained(model_src).eval()
    else:
        cfg = interp.ModelConfig(
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_vocab=4096,
            n_ctx=seq,
            n_experts=8,
            experts_per_token=2,
            d_mlp=128,
        )
        torch.manual_seed(0)
        model = interp.HookedTransformer(cfg).eval()
    V, seq = model.cfg.d_vocab, min(seq, model.cfg.n_ctx)
    ranks = torch.arange(1, V + 1, dtype=torch.float)
    zipf = 1 / ranks

    def batches():
        g = torch.Generator().manual_seed(0)
        for _ in range(-(-n_tokens // (batch * seq))):
            dom = torch.randint(0, 4, (batch,), generator=g)
            # each domain prefers its own slice of the vocabulary, so there is something to find
            shift = (
                dom[:, None] * (V // 4)
                + torch.multinomial(zipf, batch * seq, replacement=True, generator=g).view(
                    batch, seq
                )
            ) % V
            yield shift, dom

    # warm-up: imports, kernels, and the allocator's pools (MoE expert batches vary in size, so
    # glibc's heap takes a few dozen batches to reach its working size)
    moe.routing_stats(model, _warm(batches, 30), n_perm=0)
    rss0 = _rss_mb()
    t = time.perf_counter()
    res = moe.routing_stats(model, batches(), n_perm=n_perm, seed=0)
    wall = time.perf_counter() - t
    return {
        "tokens": int(res.summary["n_tokens"].iloc[0]),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(_peak_mb(), 1),
        "rss_after_warmup_mb": round(rss0, 1),
        "growth_mb": round(_peak_mb() - rss0, 1),
        "accumulator_kb": round(res.peak_accumulator_bytes / 1024, 1),
        "token_types": int(res.summary["token_types"].iloc[0]),
        "nmi_domain": round(float(res.summary["nmi_domain"].iloc[0]), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="Smaller corpus size (tokens).")
    ap.add_argument(
        "--factor", type=int, default=10, help="The larger corpus is this many times bigger."
    )
    ap.add_argument(
        "--model", default=None, help="A model for interp.load_pretrained [default: random MoE]."
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n-perm", type=int, default=200)
    ap.add_argument("--json", default=None, help="Also write the results here.")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.child, a.model, a.batch, a.seq, a.n_perm)))
        return
    rows = []
    for n in (a.tokens, a.tokens * a.factor):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--batch",
            str(a.batch),
            "--seq",
            str(a.seq),
            "--n-perm",
            str(a.n_perm),
        ] + (["--model", a.model] if a.model else [])
        out = (
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
        print(json.dumps(rows[-1]), flush=True)
    small, big = rows
    summary = {
        "runs": rows,
        "time_ratio": round(big["wall_s"] / max(small["wall_s"], 1e-9), 2),
        "peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "growth_delta_mb": round(big["growth_mb"] - small["growth_mb"], 1),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
