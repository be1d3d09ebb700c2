"""Memory of the head taxonomy when the corpus grows tenfold (it must stay flat).

Each corpus size runs in a fresh child process: the model is loaded, the peak-RSS counter is
reset (Linux ``/proc/self/clear_refs``), then :func:`analyses.heads.analyze` streams the CoNLL-U
corpus (1x, then the same sentences repeated 10x, written to a temporary file and read lazily;
repeating keeps the sentence-length distribution, so only the corpus size changes).
Reported per size: peak RSS during the analysis (``VmHWM`` after the reset), its growth over
the RSS after loading, the peak of Python allocations (``tracemalloc``, which sees lists and
frames that would grow with the corpus, not torch's buffers), wall time and tokens per second.

Usage::

    python scripts/bench_heads_memory.py                       # MiniLM, tests/data sentences x 25
    python scripts/bench_heads_memory.py --conllu ../shared/data/en_ewt-ud-dev.conllu \
        --base-sentences 500
    python scripts/bench_heads_memory.py --model smollm2-135m --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONLLU = ROOT / "tests" / "data" / "heads_sentences.conllu"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _write_corpus(src: Path, n_base: int, factor: int, path: Path) -> int:
    """The first ``n_base`` sentences of ``src`` (cycled if it has fewer), repeated ``factor``
    times, as a CoNLL-U file: the 10x corpus has the same length distribution as the 1x one,
    so only the corpus size changes (peak memory of one batch depends on its longest sentence)."""
    blocks, cur = [], []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.strip():
            if not line.startswith("#"):
                cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    base = list(itertools.islice(itertools.cycle(blocks), n_base))
    with path.open("w", encoding="utf-8") as f:
        for _ in range(factor):
            for block in base:
                f.write(block + "\n\n")
    return n_base * factor


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import tracemalloc

    import interp
    from analyses import heads, parses

    model = interp.load_pretrained(args.model)
    model.eval()
    rss_load = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    tracemalloc.start()
    t0 = time.perf_counter()
    res = heads.analyze(
        model,
        sentences=parses.read_conllu(args.corpus),
        n_random=args.n_random,
        batch_size=args.batch_size,
        max_tokens=10**12,
    )
    wall = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "sentences": args.sentences,
                "tokens": res.info["n_tokens"],
                "pairs": res.info.get("n_pairs", 0),
                "rss_after_load_mb": rss_load / 1024,
                "peak_rss_mb": _status_kb("VmHWM") / 1024,
                "peak_reset": reset,
                "tracemalloc_peak_mb": py_peak / 2**20,
                "wall_s": wall,
                "tokens_per_s": res.info["n_tokens"] / wall,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="minilm")
    p.add_argument("--conllu", type=Path, default=DEFAULT_CONLLU, help="source sentences (cycled)")
    p.add_argument("--base-sentences", type=int, default=500, help="sentences in the 1x corpus")
    p.add_argument("--factors", default="1,10")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-random", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sentences", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (int(x) for x in args.factors.split(",")):
            n = args.base_sentences * factor
            corpus = Path(tmp) / f"corpus_{factor}x.conllu"
            _write_corpus(args.conllu, args.base_sentences, factor, corpus)
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--model",
                args.model,
                "--corpus",
                str(corpus),
                "--sentences",
                str(n),
                "--batch-size",
                str(args.batch_size),
                "--n-random",
                str(args.n_random),
                "--threads",
                str(args.threads),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["factor"] = factor
            rows.append(row)
            print(
                f"{factor:>3}x  {row['sentences']:>6} sentences {row['tokens']:>8} tokens  "
                f"peak RSS {row['peak_rss_mb']:8.1f} MB "
                f"(after load {row['rss_after_load_mb']:8.1f} MB, +"
                f"{row['peak_rss_mb'] - row['rss_after_load_mb']:6.1f})  tracemalloc peak "
                f"{row['tracemalloc_peak_mb']:6.2f} MB  {row['wall_s']:7.1f} s  "
                f"{row['tokens_per_s']:8.0f} tok/s",
                flush=True,
            )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(
            f"peak RSS growth {b['factor']}x vs {a['factor']}x: "
            f"{b['peak_rss_mb'] - a['peak_rss_mb']:+.1f} MB; "
            f"tracemalloc peak {b['tracemalloc_peak_mb'] - a['tracemalloc_peak_mb']:+.2f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
