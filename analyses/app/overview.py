"""What a model is, in the words ``interp info`` prints and every report starts with.

:func:`overview_section` is the first section of ``interp report``: the model's config
(inline only what differs from the defaults; the CSV has every field), its size, where the
parameters sit (a table and a small bar chart, the figure its summary shows) and its hook
points. :func:`hook_names` and :func:`param_count` are shared with ``interp info``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from analyses.app.common import model_config
from analyses.app.paths import scrub_paths, shown_path
from analyses.app.report import Section

if TYPE_CHECKING:
    import pandas as pd

    from interp import HookedTransformer

__all__ = ["hook_names", "overview_section", "param_count", "param_groups"]


def hook_names(model: HookedTransformer) -> tuple[list[str], list[str]]:
    """(hook names outside the blocks, hook names of the first block of each stack)."""
    names = list(getattr(model, "hook_dict", {}))  # module order = forward order
    first, outside = [], []
    for name in names:
        parts = name.split(".")
        if len(parts) > 1 and parts[1].isdigit():
            if parts[1] == "0":
                first.append(name)
        else:
            outside.append(name)
    return outside, first


def param_count(model: HookedTransformer) -> int:
    """Distinct parameters: tied embedding/unembedding weights count once."""
    if hasattr(model, "param_count"):
        return int(model.param_count())
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))


def param_groups(model: HookedTransformer) -> pd.DataFrame:
    """Distinct parameters per component (``embed``, ``attn``, ``mlp``, ``ln1``, ...), summed
    over the blocks: where a model's size goes, largest first. Empty for a model that does not
    list its parameters by name (a stand-in)."""
    import pandas as pd

    counts: dict[str, int] = {}
    seen: set[int] = set()
    named = getattr(model, "named_parameters", None)
    for name, p in named() if callable(named) else ():
        if id(p) in seen:  # tied weights count once, under the first name
            continue
        seen.add(id(p))
        parts = name.split(".")
        group = parts[2] if parts[0] == "blocks" and len(parts) > 3 else parts[0]
        counts[group] = counts.get(group, 0) + int(p.numel())
    df = pd.DataFrame({"component": list(counts), "parameters": list(counts.values())})
    df = df.sort_values("parameters", ascending=False, kind="stable").reset_index(drop=True)
    df["share"] = df["parameters"] / max(int(df["parameters"].sum()), 1)
    return df


def _config_defaults(model: HookedTransformer) -> dict[str, Any]:
    """Default value of every config field that has one (dataclass configs only)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _same(a: Any, b: Any) -> bool:
    """``a == b`` as a plain bool, False where equality is not a bool (tensors, odd types)."""
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors or objects with odd __eq__
        return False


def overview_section(model: HookedTransformer, source: str) -> Section:
    """The model section every report starts with: config, size, hook points.

    ``source`` is what the user named; a path is shown without the machine's folders, as
    are paths the config holds (a Hugging Face model's ``extra["source"]``).
    """
    import pandas as pd

    cfg = model_config(model)
    shown_cfg = scrub_paths(cfg)
    outside, first = hook_names(model)
    defaults = _config_defaults(model)
    config_df = pd.DataFrame({
        "field": list(cfg),
        "value": [str(v) for v in shown_cfg.values()],
        "default": [k in defaults and _same(defaults[k], v) for k, v in cfg.items()],
    })
    # Inline, only what this model sets (dozens of fields sit at their defaults); the CSV
    # has every field.
    chosen = config_df.loc[~config_df["default"], ["field", "value"]].reset_index(drop=True)
    n_params = param_count(model)
    groups = param_groups(model)
    from analyses.app import plots

    figures = {"model_params": plots.bars(
        groups, "component", "parameters",
        title="Parameters per component (all blocks together)")} if len(groups) else {}
    big = groups.iloc[0] if len(groups) else None
    summary = [
        f"{n_params:,} parameters in {int(cfg.get('n_layers', 0))} layers"
        + (f" of {int(cfg['n_heads'])} heads" if cfg.get("n_heads") else "")
        + (f", d_model {int(cfg['d_model'])}" if cfg.get("d_model") else "") + ".",
        f"{len(getattr(model, 'hook_dict', {}))} hook points, {len(first)} per layer "
        f"(layer 0) and {len(outside)} outside the blocks.",
    ]
    if big is not None:
        summary.append(f"The largest component is {big['component']}: "
                       f"{int(big['parameters']):,} parameters ({big['share']:.0%}).")
    return Section(
        key="model",
        title=f"Model: {shown_path(source)}",
        method=("The model as loaded by `interp.load_pretrained`: its configuration (every "
                "architecture variant is a field) and its hook points."),
        source="TransformerLens hook naming (Nanda and Bloom, 2022, *TransformerLens*).",
        data="None: this section describes the model only.",
        findings=[
            f"{n_params:,} parameters",
            f"{len(getattr(model, 'hook_dict', {}))} hook points; layer 0 has {len(first)}: "
            + ", ".join(f"`{n}`" for n in first[:12]) + (" ..." if len(first) > 12 else ""),
        ],
        tables={"model_config": config_df, "model_config_set": chosen, "model_params": groups},
        figures=figures,
        summary=summary,
        summary_figure=next(iter(figures), None),
        show_tables={"model_config_set": len(chosen)} if len(chosen) else {},
    )
