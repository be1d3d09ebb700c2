"""What every ``interp`` command shares: its options, its model, its report folder.

Commands stay thin (parse, call an analysis, hand frames to the report writer); the steps
they all take live here so no command re-invents them:

- :func:`model_argument` (optional ``MODEL``) and :func:`common_options` (``--out
  --batch-size --max-tokens --device --dtype --seed --quiet --force``);
- :func:`prepare_out`, which fails on a bad ``--out`` before any slow work and holds the
  folder's lock until the command ends (so a second run on it fails at once);
- :func:`resolve_device` and :func:`load_model`, MODEL in eval mode where it was asked for;
- :func:`write_report`, sections into one report folder, with no machine path in it.

Topic modules (``analyses/app/sections/<topic>.py``) import these names from
:mod:`analyses.app.cli`, which re-exports them next to the command group.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from analyses.app.errors import CliError
from analyses.app.outdir import out_lock
from analyses.app.paths import scrub_paths, shown_in_text, shown_path
from analyses.app.report import Report, ReportError, Section

if TYPE_CHECKING:
    from interp import HookedTransformer

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "command_line",
    "common_options",
    "default_out",
    "load_model",
    "model_argument",
    "model_config",
    "prepare_out",
    "resolve_device",
    "write_report",
]

# The packaged real model (all-MiniLM-L6-v2, a 6-layer BERT) loads offline.
DEFAULT_MODEL = "minilm"
DTYPES = ("float32", "bfloat16", "float16")
F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- options


def model_argument(default: str = DEFAULT_MODEL) -> Callable[[F], F]:
    """The optional positional ``MODEL`` (a name, folder, .gguf, .pt or .json config)."""
    return click.argument("model", required=False, default=default, metavar="[MODEL]")


def common_options(func: F) -> F:
    """Add the options every analysis command shares.

    The command receives them as keyword arguments: ``out`` (Path or None: None means
    ``reports/<command>``), ``batch_size``, ``max_tokens`` (None = the analysis' default),
    ``device`` ("auto" picks cuda when available), ``dtype``, ``seed``, ``quiet``, ``force``.
    """
    options = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Report folder to write [default: reports/<command>]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Sequences per forward pass."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Stop after this many corpus tokens [default: the analysis' own]."),
        click.option("--device", default="auto", show_default=True,
                     help='Torch device: "auto", "cpu", "cuda", "cuda:1", "mps".'),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32",
                     show_default=True, help="Weights and activations dtype."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for sampling, random models and permutation baselines."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--force", is_flag=True, help="Replace an existing --out folder."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# --------------------------------------------------------------------------- the report folder


def default_out(ctx: click.Context, out: Path | None) -> Path:
    """``--out`` or ``reports/<command name>``."""
    return out if out is not None else Path("reports") / (ctx.info_name or "report")


def _main_rank() -> bool:
    """Whether this process writes reports: always, except ranks > 0 of a distributed run
    (:mod:`analyses.distributed`; torch is imported only when ``WORLD_SIZE`` > 1)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1", "0"):
        return True
    from analyses import distributed

    return distributed.world().is_main


def prepare_out(ctx: click.Context, out: Path | None, force: bool) -> Path:
    """Resolve ``--out`` and fail now, before any slow work, if the report could not be
    written there: no writable place for it, another run writing it, or an existing folder
    without ``--force``.

    Takes the folder's lock (:func:`analyses.app.outdir.out_lock`) and holds it until the
    command's context closes, so of two runs on one ``--out`` only one gets past this
    point, with or without ``--force``; the "already exists" check is made under the lock.
    """
    path = default_out(ctx, out).expanduser().absolute()
    if not _main_rank():
        return path  # only rank 0 of a distributed run writes (and locks) the report
    if path.exists() and not path.is_dir():
        raise ReportError(f"{path} exists and is not a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write to {path.parent}: {parent} is not a writable folder")
    ctx.with_resource(out_lock(path))
    if path.exists() and not force:
        raise ReportError(f"{path} already exists; use --force to replace it")
    return path


# --------------------------------------------------------------------------- the model


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; anything else is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CliError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"device {device!r} asked for, but CUDA is not available here")
    return str(dev)


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or source.startswith(".")
            or source.endswith((".json", ".pt", ".gguf", ".safetensors", ".bin")))


def load_model(source: str, device: str = "auto", dtype: str = "float32", *,
               seed: int | None = None) -> HookedTransformer:
    """Load MODEL through ``interp.load_pretrained``, in eval mode on ``device``/``dtype``.

    ``seed`` seeds torch first, so a ``.json`` config (random weights) gives the same
    model on every run. A path that does not exist fails here with one clear line rather
    than deep inside a loader.
    """
    import torch

    if _looks_like_path(source) and not Path(source).expanduser().exists():
        raise CliError(f"model file or folder not found: {source}")
    try:
        from interp import load_pretrained
    except ImportError as e:
        raise CliError(f"cannot load models: interp.load_pretrained is unavailable ({e})") from e
    if seed is not None:
        torch.manual_seed(seed)
    model = load_pretrained(str(Path(source).expanduser()) if _looks_like_path(source) else source)
    # Two positional calls: works for nn.Module.to and for TransformerLens-style
    # ``to(device_or_dtype)`` overrides alike.
    model = model.to(resolve_device(device))
    model = model.to(getattr(torch, dtype))
    model.eval()
    return model


def model_config(model: HookedTransformer) -> dict:
    """The model's config as a plain dict (for run.json, the overview and ``interp info``):
    its public fields; private bookkeeping (``ModelConfig._derived``) is not configuration."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if not f.name.startswith("_")}
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


# --------------------------------------------------------------------------- writing


def command_line(ctx: click.Context) -> list[str]:
    """The command line that started this run, as given."""
    return list(ctx.meta.get("interp.argv", sys.argv))


def write_report(
    sections: Sequence[Section],
    *,
    out: Path | None,
    force: bool,
    model_source: str,
    model: HookedTransformer | dict[str, HookedTransformer],
    seed: int,
    ctx: click.Context,
    svg: bool = False,
    title: str | None = None,
    extra: dict | None = None,
    quiet: bool = False,
    notes: list[str] | None = None,
) -> Path:
    """Write sections as one report folder and print where it went.

    ``model`` may be one model or a dict ``{source: model}`` when sections ran on
    different models (``interp report`` without MODEL). Model sources that are absolute
    paths are shown in the title, header and run.json as :func:`shown_path` shows them
    (the report writer cleans the command line and configs itself). ``notes`` are lines for
    the report's summary that no section carries (a section skipped, and why).
    """
    out = default_out(ctx, out)
    if not _main_rank():
        return out.expanduser().absolute()  # rank 0 writes; the sums it holds are the total
    sources = [*model, model_source] if isinstance(model, dict) else [model_source]
    if isinstance(model, dict):
        config = {shown_path(src): scrub_paths(model_config(m)) for src, m in model.items()}
    else:
        config = scrub_paths(model_config(model))
    report = Report(
        shown_in_text(title or f"interp {ctx.info_name}: {model_source}", sources),
        model_source=shown_in_text(model_source, sources),
        model_config=config,
        seed=seed,
        command=command_line(ctx),
        extra=extra,
        notes=notes,
    )
    for section in sections:
        report.add(section)
    path = report.write(out, force=force, svg=svg)
    if not quiet:
        click.echo(f"report written to {path / 'index.html'}", err=True)
    click.echo(str(path))
    return path
