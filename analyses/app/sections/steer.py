"""``interp steer MODEL``: steer generation with a contrastive vector and show the effect
against the coefficient (see :mod:`analyses.steering`)."""

from __future__ import annotations

import time
from pathlib import Path

import click
import pandas as pd

from analyses.app import plots
from analyses.app.cli import (
    CliError,
    cli,
    common_options,
    load_model,
    model_argument,
    prepare_out,
    write_report,
)
from analyses.app.report import Section
from interp.errors import InterpError
from interp.progress import progress_bar

DEFAULT_PROMPTS = ("I think that the movie", "Yesterday my friend told me",
                   "The new restaurant in town", "My weekend was")
DEFAULT_COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)

METHOD = """\
A steering vector is built at one hook from prompts and added there, times a coefficient, while
the model generates. **CAA** (default): the mean over contrastive prompt pairs (positive vs
negative sentiment, differing only in the last words) of the difference of the last token's
activations, added at every position. **ActAdd** (`--positive/--negative`): the per-position
difference of one prompt pair, added to the first positions of the prompt. Every prompt is
continued greedily at every coefficient (0 is the unsteered model) and each continuation is
scored with a small sentiment lexicon: (positive words - negative words) / words. The curve is
the mean score per coefficient."""
SOURCE = """\
Turner et al. 2023, *Steering Language Models With Activation Engineering* (ActAdd). Rimsky et
al. 2024, *Steering Llama 2 via Contrastive Activation Addition* (CAA)."""


def _findings(curve: pd.DataFrame, hook: str, method: str, norm: float) -> list[str]:
    mean = curve.groupby("coeff").score.mean()
    lo, hi = mean.index.min(), mean.index.max()
    base = mean.get(0.0, float("nan"))
    corr = float(curve[["coeff", "score"]].corr().iloc[0, 1]) if len(mean) > 1 else float("nan")
    return [
        f"{method.upper()} vector at `{hook}` (norm {norm:.1f}): mean lexicon score "
        f"{mean[lo]:+.3f} at coefficient {lo:g}, {base:+.3f} unsteered, {mean[hi]:+.3f} at "
        f"{hi:g}.",
        f"Correlation of coefficient and score over {len(curve)} generations: {corr:+.2f} "
        + ("(the vector moves sentiment the way it was built)." if corr > 0 else
           "(not in the direction the vector was built: try another hook or coefficients)."),
    ]


def build_steering(model: object, opts: dict) -> Section:
    """Vector, curve, tables and figure for one hook."""
    from analyses.steering import actadd_vector, caa_vector, steering_curve

    hook = opts["hook"]
    t0 = time.perf_counter()
    if opts.get("positive"):
        vec, method = actadd_vector(model, hook, opts["positive"], opts["negative"]), "actadd"
    else:
        vec, method = caa_vector(model, hook), "caa"
    curve = steering_curve(model, hook, vec, opts["prompts"], opts["coeffs"],
                           max_new_tokens=opts["max_new_tokens"], seed=opts["seed"],
                           progress=opts.get("progress"))
    findings = _findings(curve, hook, method, float(vec.norm()))
    return Section(
        key="steer", title="Steering", method=METHOD, source=SOURCE,
        data="Sentiment prompt pairs and lexicon written for this project "
             "(`analyses/steering.py`).",
        findings=findings, tables={"steer_generations": curve},
        figures={"steer_curve": plots.lines(curve, "coeff", "score",
                                            title=f"Sentiment of steered generations ({hook})",
                                            xlabel="steering coefficient",
                                            ylabel="lexicon score")},
        show_tables={"steer_generations": 60},
        timings={"steering": time.perf_counter() - t0}, summary=findings,
        summary_figure="steer_curve")


def _coeffs(text: str) -> list[float]:
    try:
        values = [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise CliError(f"--coeffs {text!r} must be comma-separated numbers, e.g. -2,0,2") from None
    if not values:
        raise CliError("--coeffs needs at least one number, e.g. -2,0,2")
    return sorted(set(values) | {0.0})


@cli.command("steer")
@model_argument(default="smollm2-135m")
@click.option("--hook", default=None, metavar="NAME",
              help="Hook to steer [default: blocks.{n_layers//3}.hook_resid_pre].")
@click.option("--coeffs", default=",".join(f"{c:g}" for c in DEFAULT_COEFFS),
              show_default=True, help="Comma-separated coefficients (0 is always added).")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt to continue; repeatable [default: four neutral openings].")
@click.option("--positive", default=None, help="ActAdd: the positive prompt (with --negative).")
@click.option("--negative", default=None, help="ActAdd: the negative prompt.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def steer_cmd(ctx: click.Context, model: str, hook: str | None, coeffs: str,
              prompts: tuple[str, ...], positive: str | None, negative: str | None,
              max_new_tokens: int, svg: bool, out: Path | None, batch_size: int,
              max_tokens: int | None, device: str, dtype: str, seed: int, quiet: bool,
              force: bool) -> None:
    """Steer MODEL's generations with a contrastive sentiment vector (CAA, or ActAdd from
    --positive/--negative) and report a lexicon score against the coefficient, with the
    generations.

    \b
    Example:
      interp steer smollm2-135m --hook blocks.10.hook_resid_pre --coeffs=-2,0,2 \\
          --out reports/steer
      interp steer smollm2-135m --positive Love --negative Hate --coeffs 0,5 \\
          --out reports/steer_actadd
    """
    if (positive is None) != (negative is None):
        raise CliError("ActAdd needs both --positive and --negative (or neither, for CAA)")
    values = _coeffs(coeffs)
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    if m.cfg.architecture != "decoder":
        raise CliError(f"steering generates text: {model} is not a decoder; use e.g. "
                       "smollm2-135m")
    hook = hook or f"blocks.{m.cfg.n_layers // 3}.hook_resid_pre"
    opts = {"hook": hook, "coeffs": values, "prompts": list(prompts or DEFAULT_PROMPTS),
            "positive": positive, "negative": negative, "max_new_tokens": max_new_tokens,
            "seed": seed, "progress": progress_bar(quiet)}
    try:
        section = build_steering(m, opts)
    except InterpError as e:
        raise CliError(str(e)) from None
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, svg=svg, quiet=quiet, title=f"interp steer: {model}")
