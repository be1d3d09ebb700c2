"""``interp report``: every registered section that applies, in one report.

The sections come from the topic modules (:mod:`analyses.app.sections`); this command only
chooses the model each one runs on, runs them in report order after the model overview
(:func:`analyses.app.overview.overview_section`), and records what ran, what was skipped and
why in ``run.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from analyses.app import common
from analyses.app.overview import overview_section
from analyses.app.paths import shown_path
from interp.progress import progress_bar

if TYPE_CHECKING:
    from analyses.app.report import Section
    from analyses.app.sections import SectionSpec
    from interp import HookedTransformer

__all__ = ["report_cmd"]


@click.command("report")
@click.argument("model", required=False, default=None, metavar="[MODEL]")
@click.option("--only", multiple=True, metavar="KEY", help="Run only these sections.")
@click.option("--skip", multiple=True, metavar="KEY", help="Leave these sections out.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@click.option("--list", "list_sections", is_flag=True, help="List registered sections and exit.")
@common.common_options
@click.pass_context
def report_cmd(ctx: click.Context, model: str | None, only: tuple[str, ...],
               skip: tuple[str, ...], svg: bool, list_sections: bool, out: Path | None,
               batch_size: int, max_tokens: int | None, device: str, dtype: str, seed: int,
               quiet: bool, force: bool) -> None:
    """Run every analysis that applies to MODEL and write one report.

    Without MODEL each section runs on its own default model (the packaged MiniLM for
    most; a section may name another, e.g. a packaged MoE checkpoint for the MoE section).
    With MODEL, every section that applies to that model runs on it.

    \b
    Example:
      interp report --out reports/default --force
      interp report smollm2-135m --only heads --out reports/smol
      interp report --list
    """
    from analyses.app.sections import FAILED, select

    specs = select(only, skip)
    if list_sections:
        for spec in specs:
            click.echo(f"{spec.key:<10} {spec.title}  (default model: "
                       f"{spec.default_model or common.DEFAULT_MODEL})")
        for name, reason in sorted(FAILED.items()):
            click.echo(f"{name:<10} unavailable: {reason}")
        return
    out = common.prepare_out(ctx, out, force)  # fail before the (slow) model load
    device = common.resolve_device(device)
    models: dict[str, HookedTransformer] = {}

    def get(source: str) -> HookedTransformer:
        if source not in models:
            # common.load_model, looked up when called, so a test can substitute a stand-in.
            models[source] = common.load_model(source, device, dtype, seed=seed)
        return models[source]

    main_source = model or common.DEFAULT_MODEL
    opts = {"batch_size": batch_size, "max_tokens": max_tokens, "device": device,
            "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg}
    sections = [overview_section(get(main_source), main_source)]
    ran: dict[str, str] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []  # for the summary: what did not run, and why
    for spec in specs:
        source = model or spec.default_model or common.DEFAULT_MODEL
        m = get(source)
        if not spec.applies(m):
            skipped[spec.key] = f"does not apply to {shown_path(source)}"
            notes.append(f"{spec.title} (`{spec.key}`): not run, it {skipped[spec.key]}.")
            continue
        section = _run_section(spec, m, {**opts, "model_source": source}, quiet)
        if len(models) > 1 or source != main_source:
            section.data = f"Model: `{shown_path(source)}`.\n\n{section.data}"
        sections.append(section)
        ran[spec.key] = shown_path(source)
    if len(sections) == 1 and not quiet:
        click.echo(f"note: no analysis section applies ({len(specs)} registered); "
                   "the report has the model overview only", err=True)
    notes += [f"`{name}`: not run, its module failed to import ({reason})."
              for name, reason in sorted(FAILED.items())]
    sources = sorted(models)
    common.write_report(
        sections, out=out, force=force, model_source=", ".join(sources),
        model=models if len(models) > 1 else models[main_source], seed=seed, ctx=ctx,
        svg=svg, quiet=quiet, title=f"interp report: {', '.join(sources)}",
        extra={"sections_ran": ran, "sections_skipped": skipped,
               "topics_failed_to_import": dict(FAILED), "options": opts},
        notes=notes,
    )


def _run_section(spec: SectionSpec, model: HookedTransformer, opts: dict[str, Any],
                 quiet: bool) -> Section:
    """Build one registered section, seeded the same way each time, its build time noted."""
    import torch

    torch.manual_seed(opts["seed"])
    t0 = time.perf_counter()
    section = spec.build(model, opts, progress_bar(quiet))
    section.timings.setdefault("build", time.perf_counter() - t0)
    return section
