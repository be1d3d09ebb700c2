"""The four ways to run the same weights: plain transformers, interp, TransformerLens, nnsight.

Each way is a :class:`Way`: one callable per workload it supports, taking tokens and returning
what it recorded, so the timing loop and the equivalence check treat every tool alike. The
workloads a way offers are the JSON's names (``no_hooks``, ``attn_mlp``, ``patterns``,
``cache_all``); nnsight has no "cache every hook point", so it offers the first three. The
optional peers return None (or raise ImportError) when they are not installed and
:func:`build_ways` turns that into a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.models import TOOLS, attn_mlp, hf_layers, set_attn


@dataclass
class Way:
    """One tool: a callable per workload, each taking tokens and returning what it recorded."""

    name: str
    run: dict[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)


def _hook_names(n: int) -> tuple[list[str], list[str]]:
    """TransformerLens-style names of every attention/MLP output, and of every pattern."""
    am = [f"blocks.{i}.hook_attn_out" for i in range(n)]
    am += [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    return am, [f"blocks.{i}.attn.hook_pattern" for i in range(n)]


def way_transformers(hf: Any) -> Way:
    """Plain transformers: SDPA forward; recording with PyTorch forward hooks; patterns and
    the full cache via eager attention (only eager returns attention weights)."""
    layers = hf_layers(hf)
    n = len(layers)

    def no_hooks(t):
        return hf(t).logits

    def record(t):
        store: dict[str, torch.Tensor] = {}

        def keep(key: str, first: bool) -> Callable[..., None]:
            def hook(module: Any, args: Any, out: Any) -> None:
                store[key] = out[0] if first and isinstance(out, tuple) else out

            return hook

        handles = []
        for i, layer in enumerate(layers):
            attn, mlp = attn_mlp(layer)
            handles.append(attn.register_forward_hook(keep(f"attn{i}", first=True)))
            handles.append(mlp.register_forward_hook(keep(f"mlp{i}", first=False)))
        try:
            hf(t)
        finally:
            for h in handles:
                h.remove()
        return [store[f"attn{i}"] for i in range(n)] + [store[f"mlp{i}"] for i in range(n)]

    def patterns(t):
        set_attn(hf, "eager")
        try:
            return list(hf(t, output_attentions=True).attentions)
        finally:
            set_attn(hf, "sdpa")

    def cache_all(t):
        set_attn(hf, "eager")
        try:
            out = hf(t, output_attentions=True, output_hidden_states=True)
            return list(out.attentions) + list(out.hidden_states)
        finally:
            set_attn(hf, "sdpa")

    run = {"no_hooks": no_hooks, "attn_mlp": record, "patterns": patterns, "cache_all": cache_all}
    return Way("transformers", run)


def way_interp(hf: Any) -> Way:
    """interp on a copy of the same weights (``interp.load_pretrained``); ``.model`` is kept."""
    import interp

    model = interp.load_pretrained(hf)
    model.eval()
    am, pats = _hook_names(model.cfg.n_layers)

    def no_hooks(t):
        return model(t)

    def record(t):
        _, cache = model.run_with_cache(t, names_filter=am, return_cache_object=False)
        return [cache[k] for k in am]

    def patterns(t):
        _, cache = model.run_with_cache(t, names_filter=pats, return_cache_object=False)
        return [cache[k] for k in pats]

    def cache_all(t):
        _, cache = model.run_with_cache(t, return_cache_object=False)
        return list(cache.values())

    run = {"no_hooks": no_hooks, "attn_mlp": record, "patterns": patterns, "cache_all": cache_all}
    w = Way("interp", run)
    w.model = model  # type: ignore[attr-defined]
    return w


def way_transformer_lens(hf: Any, folder: Path) -> Way | None:
    """TransformerLens 4.x ``TransformerBridge`` booted offline around a copy of ``hf``."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    import copy

    # the bridge re-wraps the modules it is given in place (and forces eager attention), so it
    # gets its own copy of the same weights and leaves the plain transformers model untouched
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=copy.deepcopy(hf))
    am, pats = _hook_names(len(hf_layers(hf)))

    def no_hooks(t):
        return bridge(t)

    def record(t):
        _, cache = bridge.run_with_cache(t, names_filter=lambda name: name in am)
        return [cache[k] for k in am]

    def patterns(t):
        _, cache = bridge.run_with_cache(t, names_filter=lambda name: name in pats)
        return [cache[k] for k in pats]

    def cache_all(t):
        _, cache = bridge.run_with_cache(t)
        return list(cache.values())

    run = {"no_hooks": no_hooks, "attn_mlp": record, "patterns": patterns, "cache_all": cache_all}
    return Way("transformer_lens", run)


def way_nnsight(hf: Any, tok: Any) -> Way | None:
    """nnsight's ``TransformersModel`` (``LanguageModel`` in older releases) around ``hf``."""
    try:
        import nnsight
    except ImportError:
        return None
    if tok is None:
        return None
    cls = getattr(nnsight, "TransformersModel", None)
    if cls is not None:
        lm = cls(hf, tokenizer=tok, task="text-generation")
    else:
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
    base = getattr(lm, "transformer", None) or lm.model
    layers = getattr(base, "h", None) or base.layers
    n = len(hf_layers(hf))

    def no_hooks(t):
        with lm.trace(t):
            out = lm.output.logits.save()
        return out

    def record(t):
        attn_out, mlp_out = [], []
        with lm.trace(t):  # nnsight needs module accesses in execution order
            for i in range(n):
                layer = layers[i]
                attn = getattr(layer, "attn", None) or layer.self_attn
                attn_out.append(attn.output[0].save())
                mlp_out.append(layer.mlp.output.save())
        return list(attn_out) + list(mlp_out)

    def patterns(t):
        set_attn(hf, "eager")
        try:
            saved = []
            with lm.trace(t):
                for i in range(n):
                    layer = layers[i]
                    attn = getattr(layer, "attn", None) or layer.self_attn
                    saved.append(attn.output[1].save())
            return list(saved)
        finally:
            set_attn(hf, "sdpa")

    return Way("nnsight", {"no_hooks": no_hooks, "attn_mlp": record, "patterns": patterns})


def build_ways(
    hf: Any, tok: Any, folder: Path, tools: tuple[str, ...] = TOOLS
) -> tuple[dict[str, Way], list[str]]:
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
