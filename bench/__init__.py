"""The benchmark: what recording costs, against plain transformers, TransformerLens and nnsight.

Not part of the installed package: it ships with the source checkout and runs as ``interp
bench`` (in a checkout installed with ``pip install -e``) or ``python -m bench`` from the
repository root. Results and how to read them: BENCHMARKS.md.

The same weights are loaded four ways: plain ``transformers`` (SDPA), TransformerLens 4.x
``TransformerBridge`` (booted offline around the same HF module), nnsight ``TransformersModel``
(optional extra) and interp (``interp.load_pretrained`` on the HF module). Before anything is
timed, every way's outputs are checked against transformers' (:func:`check_equivalence`).

Workloads (names are the JSON contract):

- ``no_hooks``: a forward pass, batch 8 x 128, and batch 1 x 8 for the fixed per-call overhead;
- ``attn_mlp``: record every layer's attention and MLP outputs;
- ``patterns``: record every layer's attention pattern;
- ``cache_all``: cache every hook point the tool has;
- ``long_context``: 1 x 4096 tokens, no pattern hooks and one layer's pattern: time and peak
  memory, each tool in its own process;
- ``streaming``: head-taxonomy scores streamed over a corpus and one ten times larger:
  tokens/s and peak memory, each in its own process.

Timing: tools run interleaved after warm-up, the reference (plain transformers without hooks)
and every tool in an order rotated each round; every ratio is the median over rounds of (tool
time / that round's reference time), so slow drifts of the machine cancel. Peak memory is the
process high-water mark (VmHWM) reset just before the measured call (Linux ``clear_refs``), in
a fresh process per (tool, workload). With ``device="cuda"`` calls are timed with CUDA events
and peak memory is PyTorch's peak allocated device memory over the call (never run here: no
GPU was available to this project).

The package, in reading order: ``models`` (the names; the HF model every way shares),
``ways`` (the four tools), ``equivalence`` (they compute the same), ``timing`` (interleaved
rounds), ``memory`` (peak memory; one process each), ``worker`` (that process), ``run`` (the
whole run), ``table`` (the printed table), ``cli`` (the options).
"""

from __future__ import annotations

from bench.equivalence import check_equivalence
from bench.memory import measure_peak, run_isolated
from bench.models import MODELS, TOOLS, WORKLOADS, build_hf, gpt2_tokenizer
from bench.run import machine, run_bench
from bench.table import format_table
from bench.timing import _REF as _REF  # the reference slot's name, in every round's order
from bench.timing import time_workload
from bench.ways import (
    Way,
    build_ways,
    way_interp,
    way_nnsight,
    way_transformer_lens,
    way_transformers,
)

__all__ = [
    "MODELS",
    "TOOLS",
    "WORKLOADS",
    "Way",
    "build_hf",
    "build_ways",
    "check_equivalence",
    "format_table",
    "gpt2_tokenizer",
    "machine",
    "measure_peak",
    "run_bench",
    "run_isolated",
    "time_workload",
    "way_interp",
    "way_nnsight",
    "way_transformer_lens",
    "way_transformers",
]
