"""Peak memory of training an SAE from an activation store of 1x and 10x the tokens (issue 23).

For each size a store is written (``interp activations``, float32, 8192-token shards), then
two fresh processes train the same TopK SAE over one full pass of it: one streams the store
(``train_sae(ActivationStore(DIR), cfg)``), the other first loads every row into one
in-memory matrix, as training without a store must. Peak resident memory is read from
``getrusage`` of each process (``bench.activations_memory._child``). The claim: the streaming
peak does not grow with the store, the in-memory one grows with its bytes.

    python -m bench.sae_store_memory --json sae_store_memory.json

Model and corpus as ``bench.activations_memory`` (random 4-layer decoder, d_model 256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.activations_memory import MODEL, _child, _corpus

HOOK = "blocks.1.hook_resid_post"
BATCH = 4096
TRAIN = (
    "import sys, torch\n"
    "from interp.activation_store import ActivationStore\n"
    "from analyses.dictionary.sae import SAEConfig\n"
    "from analyses.dictionary.train import train_sae\n"
    "store = ActivationStore(sys.argv[1])\n"
    "acts = store if sys.argv[2] == 'stream' else torch.cat(\n"
    f"    [store.shard(i, ['{HOOK}'])['{HOOK}'] for i in range(len(store.shards))])\n"
    f"cfg = SAEConfig(d_in=256, d_sae=1024, architecture='topk', k=32, hook_name='{HOOK}')\n"
    f"steps = store.n_tokens // {BATCH} + 1\n"
    f"sae, hist = train_sae(acts, cfg, steps=steps, batch_size={BATCH})\n"
    "print(steps, round(float(hist.mse.iloc[-1]), 4))\n"
)


def run(base_docs: int, work: Path) -> list[dict]:
    model = work / "model.json"
    model.write_text(json.dumps(MODEL))
    rows = []
    for scale in (1, 10):
        corpus = work / f"corpus_{scale}x.txt"
        _corpus(corpus, base_docs * scale)
        out = work / f"acts_{scale}x"
        _child([sys.executable, "-m", "analyses.app.cli", "activations", str(model),
                "--hooks", HOOK, "--corpus", str(corpus), "--out", str(out), "--seq-len", "128",
                "--shard-tokens", "8192", "--device", "cpu"])
        index = json.loads((out / "index.json").read_text())
        row = {"corpus": f"{scale}x", "tokens": index["n_tokens"],
               "shards": len(index["shards"]),
               "disk_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1)}
        for way in ("stream", "in_memory"):
            secs, peak, said = _child([sys.executable, "-c", TRAIN, str(out), way])
            steps, mse = said.split()
            row.update({f"{way}_s": round(secs, 1), f"{way}_peak_rss_mb": peak,
                        "steps": int(steps), f"{way}_final_mse": float(mse)})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=60, help="documents in the 1x corpus")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="interp_bench_sae_") as tmp:
        rows = run(args.docs, Path(tmp))
    text = json.dumps({"machine": f"{os.cpu_count()} CPUs", "model": MODEL, "hook": HOOK,
                       "batch_size": BATCH, "rows": rows}, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
