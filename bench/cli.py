"""The benchmark's command line: ``interp bench`` in a checkout, or ``python -m bench``.

The options are defined once, here. ``analyses/app/sections/bench.py`` attaches this command to
``interp`` when the source checkout's ``bench/`` is there; ``bench/__main__.py`` runs it on its
own. Bad input is one ``error: ...`` line and exit code 2 either way (:class:`BenchError`, the
same contract as the app's ``CliError``, which the bench does not import: nothing outside the
app layer does). The harness is called through the ``bench`` package (``bench.run_bench``, ...)
so that a test can replace a piece of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click


class BenchError(click.ClickException):
    """A user-facing error: printed as one ``error: ...`` line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _split(value: str, valid: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma-separated option as a tuple, every item one of ``valid``."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in valid]
    if bad or not items:
        raise BenchError(
            f"unknown {what} {', '.join(bad) or repr(value)}; valid: {', '.join(valid)}"
        )
    return items


@click.command(
    "bench", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option("--models", default="gpt2-small,smollm2-135m", show_default=True,
              help="Comma-separated: gpt2-small, smollm2-135m.")
@click.option("--workloads", default="no_hooks,attn_mlp,patterns,cache_all,long_context,streaming",
              show_default=True, help="Comma-separated workloads.")
@click.option("--tools", default="transformers,transformer_lens,nnsight,interp", show_default=True,
              help="Comma-separated tools; missing optional peers are skipped with a note.")
@click.option("--rounds", default=7, show_default=True, type=click.IntRange(1, 1000),
              help="Interleaved timing rounds.")
@click.option("--long-tokens", default=4096, show_default=True,
              type=click.IntRange(16, 1 << 16), help="Long-context length.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda (CUDA events time GPU runs).")
@click.option("--threads", default=0, type=click.IntRange(0, 1024),
              help="torch threads (0 = torch's default).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--keep-freed-memory", is_flag=True,
              help="Call interp.keep_freed_memory() first (glibc keeps freed memory for reuse; "
                   "all tools benefit). Timed workloads only: peak-memory workers always run "
                   "with the default allocator.")
@click.option("--no-reuse-recorded-memory", is_flag=True,
              help="Do not opt in to interp's reuse of a recorded cache's freed memory for the "
                   "next recording, which the bench turns on for its own process (glibc trims "
                   "freed memory again, as before change 6 in BENCHMARKS.md).")
@click.option("--cpu-linear", type=click.Choice(["onednn", "aten"]), default=None,
              help="interp's float32 CPU linear kernel without autograd: oneDNN (interp's "
                   "default) or F.linear (MKL, what the peers run; change 9 in BENCHMARKS.md). "
                   "Default: INTERP_CPU_LINEAR, else oneDNN.")
@click.option("--quiet", is_flag=True, help="Print only the table.")
def bench_cmd(models: str, workloads: str, tools: str, rounds: int, long_tokens: int,
              device: str, threads: int, json_path: Path | None, seed: int,
              keep_freed_memory: bool, no_reuse_recorded_memory: bool, cpu_linear: str | None,
              quiet: bool) -> None:
    """Time interp against plain transformers, TransformerLens and nnsight on the same weights.

    Interleaved rounds after warm-up; medians and per-round ratios to plain transformers
    without hooks; peak memory of long-context and streaming workloads in their own processes.

    \b
    Example:
      interp bench --models gpt2-small --rounds 5 --json bench.json
    """
    import torch

    import bench

    ms = _split(models, bench.MODELS, "model")
    ws = _split(workloads, bench.WORKLOADS, "workload")
    ts = _split(tools, bench.TOOLS, "tool")
    if "transformers" not in ts or "interp" not in ts:
        raise BenchError("--tools must include transformers (the reference) and interp")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(
            "--device cuda was asked for but no CUDA device is available; use --device cpu"
        )
    if json_path is not None and not json_path.parent.exists():
        raise BenchError(f"--json folder {json_path.parent} does not exist; create it first")
    if threads:
        torch.set_num_threads(threads)
    from interp.perf import kernels

    if cpu_linear is not None:
        kernels.use_onednn_linear(cpu_linear == "onednn")
        os.environ["INTERP_CPU_LINEAR"] = cpu_linear  # the peak-memory worker processes too
    allocator = _allocator(keep_freed_memory, no_reuse_recorded_memory)
    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    result = bench.run_bench(models=ms, workloads=ws, tools=ts, rounds=rounds, device=device,
                             long_tokens=long_tokens, progress=say, seed=seed)
    result["machine"]["allocator"] = allocator
    linear = "oneDNN" if kernels.uses_onednn_linear() else "F.linear (MKL)"
    result["machine"]["interp_cpu_linear"] = linear
    click.echo(bench.format_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}")
    if json_path is not None:
        tmp = json_path.with_suffix(json_path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(json_path)


def _allocator(keep_freed_memory: bool, no_reuse_recorded_memory: bool) -> str:
    """Apply the allocator flags (here and in the worker processes); the JSON's description."""
    import interp
    from interp.perf import memory

    if keep_freed_memory and no_reuse_recorded_memory:
        raise BenchError(
            "--keep-freed-memory and --no-reuse-recorded-memory contradict each other; pass one"
        )
    if no_reuse_recorded_memory:
        memory.reuse_recorded_memory(False)
        os.environ["INTERP_REUSE_CACHE_MEMORY"] = "0"  # and in the peak-memory worker processes
        allocator = "glibc default (interp's reuse of recorded memory off)"
    else:  # opt in for this process and its workers (interp's default leaves malloc alone)
        memory.reuse_recorded_memory(True)
        os.environ["INTERP_REUSE_CACHE_MEMORY"] = "1"
        allocator = "default"
        if memory.reuses_recorded_memory():
            allocator = "glibc, freed memory up to 2x interp's largest recorded cache kept (opt-in)"
    if keep_freed_memory:
        if not interp.keep_freed_memory():
            raise BenchError(
                "--keep-freed-memory needs glibc (Linux); run without it on this platform"
            )
        allocator = "glibc, freed memory kept (interp.keep_freed_memory)"
    return allocator
