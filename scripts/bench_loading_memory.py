"""Peak memory while loading, against the float32 size of the model (issue 3: "loading streams
tensors; peak memory while loading stays under twice the fp32 model size").

Each load runs in a fresh child process. The child imports torch, transformers and interp
first, then resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads
the resident set size (RSS); after ``interp.load_pretrained`` it reads the new high-water mark
(``VmHWM``). "peak while loading" is that high-water mark minus the RSS before the load, so
import costs are excluded; "after" is the RSS the loaded model keeps, "after reading every
weight" the RSS once memory-mapped weights (safetensors tensors used as they are, ``.pt``
checkpoints) have been paged in (they are copy-on-write mappings of the file). Linux only.

    python scripts/bench_loading_memory.py            # all cases, a Markdown table
    python scripts/bench_loading_memory.py --quick    # skip the generated 0.5 GB checkpoint
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


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(source: str) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline, like interp's own imports)

    import interp
    import interp.loading.gguf  # noqa: F401

    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    model = interp.load_pretrained(source)
    seconds = time.perf_counter() - t0
    peak, after = _status("VmHWM"), _status("VmRSS")
    with torch.no_grad():  # memory-mapped weights become resident when first read
        for p in model.parameters():
            p.sum()
    used = _status("VmRSS")
    fp32 = model.param_count() * 4
    print(
        json.dumps(
            {
                "source": source,
                "params": model.param_count(),
                "fp32_mb": fp32 / 2**20,
                "peak_mb": (peak - before) / 2**20,
                "after_mb": (after - before) / 2**20,
                "used_mb": (used - before) / 2**20,
                "peak_over_fp32": (peak - before) / fp32,
                "seconds": seconds,
            }
        )
    )


def make_folder(out: Path) -> None:
    """A random Llama in GPT-2-small proportions (12 layers, d_model 768, ~0.5 GB fp32
    safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)


def make_checkpoint(out: Path) -> None:
    """SmolLM2 re-saved as an interp checkpoint (.pt, float32)."""
    import interp
    from interp.loading import save_checkpoint

    save_checkpoint(interp.load_pretrained("smollm2-135m"), out)


def run(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--make-folder", help=argparse.SUPPRESS)
    p.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick",
        action="store_true",
        help="skip the generated 0.5 GB Llama folder and the .pt case",
    )
    a = p.parse_args()
    if a.child:
        return child(a.child)
    if a.make_folder:
        return make_folder(Path(a.make_folder))
    if a.make_checkpoint:
        return make_checkpoint(Path(a.make_checkpoint))
    rows = []
    with tempfile.TemporaryDirectory(prefix="interp-bench-mem-") as tmp:
        cases = [
            ("minilm (safetensors folder)", "minilm"),
            ("smollm2-135m (Q4_1 GGUF)", "smollm2-135m"),
        ]
        if not a.quick:
            folder, ckpt = Path(tmp) / "llama-768", Path(tmp) / "smollm2.pt"
            run(["--make-folder", str(folder)])
            run(["--make-checkpoint", str(ckpt)])
            cases += [
                ("random Llama 12x768 (fp32 safetensors)", str(folder)),
                ("smollm2 as interp .pt", str(ckpt)),
            ]
        for label, source in cases:
            r = json.loads(run(["--child", source]))
            rows.append((label, r))
            print(f"{label}: {json.dumps(r)}", file=sys.stderr)
    print(
        "| source | params | fp32 size (MB) | peak while loading (MB) | peak / fp32 "
        "| after load (MB) | after reading every weight (MB) | load time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['params'] / 1e6:.1f}M | {r['fp32_mb']:.0f} | {r['peak_mb']:.0f} "
            f"| {r['peak_over_fp32']:.2f} "
            f"| {r['after_mb']:.0f} | {r['used_mb']:.0f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
