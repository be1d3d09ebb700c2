"""One peak-memory measurement, run in its own process: ``python -m bench.worker '<json spec>'``.

:func:`bench.memory.run_isolated` starts this module with a JSON spec (``model``, ``tool``,
``workload``, optional ``tokens``, ``sequences``, ``seed``, ``device``, ``threads``); the last
line it prints is the JSON result. A fresh process per measurement means the peak belongs to
that one call and to nothing that ran before it.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

from bench.memory import measure_peak
from bench.models import build_hf
from bench.ways import way_nnsight, way_transformer_lens


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One tool, one memory workload (``long_context`` or ``streaming``)."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = spec.get("device", "cpu")
    tool, wl = spec["tool"], spec["workload"]
    if wl == "long_context":
        return _long_context(spec, tool, device)
    if wl == "streaming":
        if tool != "interp":
            return {"skipped": "streaming head taxonomy is an interp analysis"}
        return _streaming(spec, device)
    raise ValueError(wl)


def _load(spec: dict[str, Any], device: str) -> tuple[Any, Any, Path]:
    """The spec's HF model on ``device``, its tokenizer and folder. Each workload loads its own,
    so that deleting ``hf`` there (interp keeps its own copy) really frees the weights."""
    hf, tok, folder = build_hf(spec["model"], seed=spec.get("seed", 0))
    hf.to(device)  # every way below copies or wraps these weights on their device
    return hf, tok, folder


def _long_context(spec: dict[str, Any], tool: str, device: str) -> dict[str, Any]:
    """Time and peak memory of one long sequence: no pattern hooks, and one layer's patterns."""
    hf, tok, folder = _load(spec, device)
    T = spec.get("tokens", 4096)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (1, T), generator=gen).to(device)
    res: dict[str, Any] = {}
    with torch.no_grad():
        if tool == "transformers":
            res["no_patterns"] = measure_peak(lambda: hf(ids).logits, device)
        elif tool == "interp":
            import interp

            m = interp.load_pretrained(hf).to(device)
            del hf
            gc.collect()
            one = ["blocks.0.attn.hook_pattern"]
            res["no_patterns"] = measure_peak(lambda: m(ids), device)
            res["one_layer_patterns"] = measure_peak(
                lambda: m.run_with_cache(ids, names_filter=one, return_cache_object=False),
                device,
            )
        elif tool == "transformer_lens":
            w = way_transformer_lens(hf, folder)
            res["no_patterns"] = measure_peak(lambda: w.run["no_hooks"](ids), device)
            res["one_layer_patterns"] = measure_peak(lambda: w.run["patterns"](ids)[0], device)
        elif tool == "nnsight":
            w = way_nnsight(hf, tok)
            if w is None:
                return {"skipped": "nnsight not installed"}
            res["no_patterns"] = measure_peak(lambda: w.run["no_hooks"](ids), device)
    return {k: {"seconds": v[0], "peak_mib": v[1]} for k, v in res.items()}


def _streaming(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Head-taxonomy scores streamed over a corpus and one ten times larger: speed and peak."""
    import interp
    from analyses import heads

    hf, _, _ = _load(spec, device)
    m = interp.load_pretrained(hf).to(device)  # heads.scan moves each batch to the model's device
    del hf
    gc.collect()
    vocab = heads.VocabInfo.from_model(m)
    out = {}
    for scale in (1, 10):
        n_seq = spec.get("sequences", 16) * scale
        gen = torch.Generator().manual_seed(0)

        def corpus(n_seq=n_seq, gen=gen):
            for _ in range(n_seq // 8):
                t = torch.randint(0, m.cfg.d_vocab, (8, 128), generator=gen)
                yield heads.TokenBatch(t, torch.ones_like(t, dtype=torch.bool))

        def stream(corpus=corpus):
            acc = heads.TokenStats(m, vocab, semantic=True)
            heads.scan(m, corpus(), [acc])
            return acc.frame()

        dt, peak = measure_peak(stream, device)
        out[f"{scale}x"] = {
            "seconds": dt,
            "peak_mib": peak,
            "tokens": n_seq * 128,
            "tokens_per_s": n_seq * 128 / dt,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
