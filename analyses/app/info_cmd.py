"""``interp info``: a model's architecture, variant choices, size and hook names.

The quickest look at a model before analysing it: what the loader made of MODEL (every
variant choice is a config field) and which hook names to use from Python.
"""

from __future__ import annotations

import click

from analyses.app import common
from analyses.app.overview import hook_names, param_count

__all__ = ["info_cmd"]


@click.command("info")
@common.model_argument()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
def info_cmd(model: str, as_json: bool) -> None:
    """Show MODEL's architecture, variant choices, parameter count and hook names.

    \b
    Example:
      interp info                      # the packaged MiniLM
      interp info smollm2-135m
      interp info interp/data/induction.pt --json
    """
    import json

    # common.load_model, looked up when called, so a test can substitute a stand-in model.
    m = common.load_model(model, "cpu", "float32", seed=0)
    cfg = common.model_config(m)
    outside, first = hook_names(m)
    n_params = param_count(m)
    layers = _layer_lines(m)
    memory = _memory_rows(m)
    if as_json:
        from analyses.app.report import _json_safe

        click.echo(json.dumps(_json_safe({
            "model": model, "parameters": n_params, "config": cfg,
            "hooks": {"model": outside, "layer_0": first},
            "n_hooks": len(getattr(m, "hook_dict", {})),
            "layers": layers,
            "memory": memory,
        }), indent=2))
        return
    click.echo(f"model       {model}")
    click.echo(f"class       {type(m).__name__}")
    click.echo(f"parameters  {n_params:,}")
    click.echo("config:")
    width = max((len(k) for k in cfg), default=0)
    for key, value in cfg.items():
        click.echo(f"  {key:<{width}}  {value}")
    if layers:
        click.echo("layers (attention, RoPE, soft-cap):")
        for i, line in enumerate(layers):
            click.echo(f"  {i:>3}  {line}")
    _echo_memory(memory)
    click.echo(f"hooks ({len(getattr(m, 'hook_dict', {}))} in all), outside the layers:")
    for name in outside:
        click.echo(f"  {name}")
    click.echo("hooks of layer 0 (MoE layers add router and expert hooks):")
    for name in first:
        click.echo(f"  {name}")


def _layer_lines(m: object) -> list[str]:
    """One line per layer (global or sliding window, RoPE base and scaling, soft-cap), for a
    model with an interp config; per-layer patterns (Gemma 2/3, Qwen2 max_window_layers) are
    read here rather than from a flat config dump."""
    from interp.config import ModelConfig
    from interp.config_variants import describe_layers

    cfg = getattr(m, "cfg", None)
    return describe_layers(cfg) if isinstance(cfg, ModelConfig) else []


def _memory_rows(m: object) -> list[dict]:
    """Parameter and activation memory per dtype and context (:mod:`interp.memory_estimate`),
    for decoder/encoder stacks (an encoder-decoder needs decoder inputs to measure: none)."""
    from interp.config import ModelConfig
    from interp.memory_estimate import memory_table

    if not isinstance(getattr(m, "cfg", None), ModelConfig) or not hasattr(m, "blocks"):
        return []
    return memory_table(m)


def _echo_memory(rows: list[dict]) -> None:
    if not rows:
        return
    click.echo("memory (parameters; full cache and one hook_resid_post, per sequence):")
    click.echo(f"  {'dtype':<9} {'context':>7}  {'parameters':>10}  {'full cache':>10}  "
               f"{'resid hook':>10}")
    for r in rows:
        click.echo(f"  {r['dtype']:<9} {r['context']:>7}  {r['parameters']:>10}  "
                   f"{r['full_cache']:>10}  {r['resid_hook']:>10}")
