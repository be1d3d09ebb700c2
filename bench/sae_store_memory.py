"""Peak memory of training an SAE from an activation store of 1x, 10x and 40x the tokens
(issue 23).

A 1x store is written (``interp activations``, float32, 8192-token shards); the 10x and 40x
stores repeat its shard files (hard links, so no extra disk or write time; every row is read
from its file like any other). For each size two fresh processes train the same TopK SAE for
the same steps (one pass over the 40x store, so every size does the same work): one streams
the store (``train_sae(ActivationStore(DIR), cfg)``), the other first loads every row into
one in-memory matrix, as training without a store must. Peak resident memory is read from
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
SCALES = (1, 10, 40)
TRAIN = (
    "import sys, torch\n"
    "from interp.activation_store import ActivationStore\n"
    "from analyses.dictionary.sae import SAEConfig\n"
    "from analyses.dictionary.train import train_sae\n"
    "store = ActivationStore(sys.argv[1])\n"
    "acts = store if sys.argv[2] == 'stream' else torch.cat(\n"
    f"    [store.shard(i, ['{HOOK}'])['{HOOK}'] for i in range(len(store.shards))])\n"
    f"cfg = SAEConfig(d_in=256, d_sae=512, architecture='topk', k=32, hook_name='{HOOK}')\n"
    f"sae, hist = train_sae(acts, cfg, steps=int(sys.argv[3]), batch_size={BATCH})\n"
    "print(round(float(hist.mse.iloc[-1]), 4))\n"
)


def _replicate(src: Path, out: Path, times: int) -> dict:
    """A store of ``src``'s shards repeated ``times`` times (hard links), with its index."""
    index = json.loads((src / "index.json").read_text())
    out.mkdir()
    shards = []
    for _ in range(times):
        for s in index["shards"]:
            name = f"shard_{len(shards):05d}.safetensors"
            os.link(src / s["file"], out / name)
            shards.append({"file": name, "n_tokens": s["n_tokens"]})
    index.update(shards=shards, n_tokens=index["n_tokens"] * times)
    (out / "index.json").write_text(json.dumps(index))
    return index


def run(base_docs: int, work: Path) -> list[dict]:
    model = work / "model.json"
    model.write_text(json.dumps(MODEL))
    corpus = work / "corpus.txt"
    _corpus(corpus, base_docs)
    base = work / "acts_1x"
    _child([sys.executable, "-m", "analyses.app.cli", "activations", str(model),
            "--hooks", HOOK, "--corpus", str(corpus), "--out", str(base), "--seq-len", "128",
            "--shard-tokens", "8192", "--device", "cpu"])
    n_base = json.loads((base / "index.json").read_text())["n_tokens"]
    steps = -(-n_base * max(SCALES) // BATCH)
    rows = []
    for scale in SCALES:
        out = base if scale == 1 else work / f"acts_{scale}x"
        index = _replicate(base, out, scale) if scale > 1 else json.loads(
            (base / "index.json").read_text())
        row = {"corpus": f"{scale}x", "tokens": index["n_tokens"],
               "shards": len(index["shards"]),
               "rows_mb": round(index["n_tokens"] * 256 * 4 / 1e6, 1), "steps": steps}
        for way in ("stream", "in_memory"):
            secs, peak, said = _child([sys.executable, "-c", TRAIN, str(out), way, str(steps)])
            row.update({f"{way}_s": round(secs, 1), f"{way}_peak_rss_mb": peak,
                        f"{way}_final_mse": float(said.split()[-1])})
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
                       "batch_size": BATCH, "d_sae": 512, "rows": rows}, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
