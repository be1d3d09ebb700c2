"""The ``interp`` command line: shared plumbing plus ``info``, ``plot`` and ``report``.

Commands stay thin (parse, call an analysis, hand frames to the report writer). What every
command shares lives here so the topic modules (``analyses/app/sections/<topic>.py``) import
it instead of re-inventing it:

- :data:`cli`, the click group; topics add commands with ``@cli.command(...)`` or
  ``cli.add_command(...)`` (see :mod:`analyses.app.sections` for discovery).
- :func:`common_options` (``--out --batch-size --max-tokens --device --dtype --seed
  --quiet --force``) and :func:`model_argument` (optional ``MODEL``).
- :func:`load_model`, :func:`write_report`, :func:`progress`, :class:`CliError`.

Error contract (DESIGN.md, "Command line"): bad input prints ONE line ``error: <message>``
on stderr and exits with code 2, never a traceback; Ctrl-C prints ``interrupted`` and
exits 130. The report writer builds in a temporary folder, so neither leaves a half-
written report behind. Real bugs (anything not listed in :data:`USER_ERRORS`) still show
their traceback, and ``INTERP_DEBUG=1`` shows it for user errors too.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from analyses.app.report import Report, ReportError, Section

__all__ = [
    "DEFAULT_MODEL",
    "CliError",
    "cli",
    "common_options",
    "load_model",
    "main",
    "model_argument",
    "prepare_out",
    "progress",
    "write_report",
]

# The packaged real model (all-MiniLM-L6-v2, a 6-layer BERT) loads offline.
DEFAULT_MODEL = "minilm"
DTYPES = ("float32", "bfloat16", "float16")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ReportError)
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user-facing error: printed as one ``error: ...`` line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {_one_line(self.format_message())}", err=True)


def _one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line for the terminal."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) or "unknown error"


def _describe(exc: BaseException) -> str:
    """The user-facing text of an exception, without Python's decorations."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, KeyError) and type(exc) is KeyError and exc.args:
        return f"not found: {exc.args[0]}"
    return str(exc) or type(exc).__name__


class InterpGroup(click.Group):
    """The ``interp`` group: lazy topic discovery and the one-line error contract.

    The error handling sits in :meth:`main` (not only in the console-script wrapper) so
    ``click.testing.CliRunner`` sees exactly what a user sees.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        from analyses.app.sections import load_topics

        load_topics()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from analyses.app.sections import load_topics

        load_topics()
        return super().get_command(ctx, cmd_name)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        ctx = super().make_context(info_name, list(args), parent=parent, **extra)
        # Keep the raw command line for run.json / the report header.
        ctx.meta.setdefault("interp.argv", ["interp", *args])
        return ctx

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str | None,
             complete_var: str | None, **extra: Any) -> int:
        debug = bool(os.environ.get("INTERP_DEBUG"))
        try:
            rv = super().main(args=args, prog_name=prog_name or "interp",
                              complete_var=complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            return e.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            return 130
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
            return 2
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            return e.exit_code
        except USER_ERRORS as e:
            if debug:
                raise
            click.echo(f"error: {_one_line(_describe(e))}", err=True)
            return 2


@click.group("interp", cls=InterpGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                "max_content_width": 100})
@click.version_option(package_name="interp", prog_name="interp")
def cli() -> None:
    """interp: hook any transformer, classify its heads, probe FFN knowledge, measure
    MoE specialisation and masking effects, and write reports.

    MODEL is "minilm" (the packaged all-MiniLM-L6-v2, the default), "smollm2-135m", a
    Hugging Face checkpoint folder, a .gguf file, an interp .pt checkpoint, or a .json
    ModelConfig file for a randomly initialised model.

    \b
    Example:
      interp info minilm
      interp plot minilm --text "The cat sat on the mat." --layer 2 --head 3 --out plots/cat
      interp report --out reports/default --force
    """


def main() -> None:
    """Console-script entry point (``interp = "analyses.app.cli:main"``)."""
    # Figures are written to files; never open a window or need a display.
    os.environ.setdefault("MPLBACKEND", "Agg")
    cli.main(prog_name="interp")


# --------------------------------------------------------------------------- shared options


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


def default_out(ctx: click.Context, out: Path | None) -> Path:
    """``--out`` or ``reports/<command name>``."""
    return out if out is not None else Path("reports") / (ctx.info_name or "report")


def prepare_out(ctx: click.Context, out: Path | None, force: bool) -> Path:
    """Resolve ``--out`` and fail now, before any slow work, if the report could not be
    written there: an existing folder without ``--force``, or no writable place for it."""
    path = default_out(ctx, out).expanduser().absolute()
    if path.exists() and not force:
        raise ReportError(f"{path} already exists; use --force to replace it")
    if path.exists() and not path.is_dir():
        raise ReportError(f"{path} exists and is not a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write to {path.parent}: {parent} is not a writable folder")
    return path


def progress(iterable: Iterable[T], desc: str = "", quiet: bool = False,
             total: int | None = None) -> Iterator[T]:
    """tqdm on stderr, silent under ``--quiet``.

    Analyses take a ``progress`` callable with the signature ``progress(iterable,
    desc="", total=None)``; commands pass ``functools.partial(progress, quiet=quiet)``.
    """
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False,
                     file=sys.stderr, dynamic_ncols=True))


def progress_for(quiet: bool) -> Callable[..., Iterator]:
    """The ``progress`` callable to hand to analyses and section builders."""
    return functools.partial(progress, quiet=quiet)


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
               seed: int | None = None) -> Any:
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


def model_config(model: Any) -> dict:
    """The model's config as a plain dict (for run.json)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dict(vars(cfg))


def command_line(ctx: click.Context) -> list[str]:
    """The command line that started this run, as given."""
    return list(ctx.meta.get("interp.argv", sys.argv))


def write_report(
    sections: Sequence[Section],
    *,
    out: Path | None,
    force: bool,
    model_source: str,
    model: Any,
    seed: int,
    ctx: click.Context,
    svg: bool = False,
    title: str | None = None,
    extra: dict | None = None,
    quiet: bool = False,
) -> Path:
    """Write sections as one report folder and print where it went.

    ``model`` may be one model or a dict ``{source: model}`` when sections ran on
    different models (``interp report`` without MODEL).
    """
    out = default_out(ctx, out)
    if isinstance(model, dict):
        config = {src: model_config(m) for src, m in model.items()}
    else:
        config = model_config(model)
    report = Report(
        title or f"interp {ctx.info_name}: {model_source}",
        model_source=model_source,
        model_config=config,
        seed=seed,
        command=command_line(ctx),
        extra=extra,
    )
    for section in sections:
        report.add(section)
    path = report.write(out, force=force, svg=svg)
    if not quiet:
        click.echo(f"report written to {path / 'index.html'}", err=True)
    click.echo(str(path))
    return path


# --------------------------------------------------------------------------- interp info


def _hook_names(model: Any) -> tuple[list[str], list[str]]:
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


def _param_count(model: Any) -> int:
    """Distinct parameters: tied embedding/unembedding weights count once."""
    if hasattr(model, "param_count"):
        return int(model.param_count())
    return int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))


def _tokenize(model: Any, text: str) -> tuple[Any, list[str], str]:
    """(token ids [1, pos], one label per token, a note for the report).

    A random model built from a .json config has no tokenizer; rather than refuse, use
    the text's UTF-8 bytes as token ids (needs d_vocab >= 256), which is enough to look
    at positional structure (previous-token, sink, local heads).
    """
    import torch

    if getattr(model, "tokenizer", True) is not None:
        return model.to_tokens(text), [str(t) for t in model.to_str_tokens(text)], ""
    vocab = int(getattr(model.cfg, "d_vocab", 0))
    if vocab < 256:
        raise CliError(f"the model has no tokenizer and d_vocab={vocab} < 256, so the text "
                       "cannot be fed to it as bytes")
    data = text.encode("utf-8")
    ids = torch.tensor([list(data)], dtype=torch.long)
    labels = [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in data]
    return ids, labels, "The model has no tokenizer: the text's UTF-8 bytes are the token ids."


@cli.command("info")
@model_argument()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")
def info_cmd(model: str, as_json: bool) -> None:
    """Show MODEL's architecture, variant choices, parameter count and hook names.

    \b
    Example:
      interp info                      # the packaged MiniLM
      interp info smollm2-135m
      interp info my_config.json --json
    """
    import json

    m = load_model(model, "cpu", "float32", seed=0)
    cfg = model_config(m)
    outside, first = _hook_names(m)
    n_params = _param_count(m)
    if as_json:
        from analyses.app.report import _json_safe

        click.echo(json.dumps(_json_safe({
            "model": model, "parameters": n_params, "config": cfg,
            "hooks": {"model": outside, "layer_0": first},
            "n_hooks": len(getattr(m, "hook_dict", {})),
        }), indent=2))
        return
    click.echo(f"model       {model}")
    click.echo(f"class       {type(m).__name__}")
    click.echo(f"parameters  {n_params:,}")
    click.echo("config:")
    width = max((len(k) for k in cfg), default=0)
    for key, value in cfg.items():
        click.echo(f"  {key:<{width}}  {value}")
    click.echo(f"hooks ({len(getattr(m, 'hook_dict', {}))} in all), outside the layers:")
    for name in outside:
        click.echo(f"  {name}")
    click.echo("hooks of layer 0 (MoE layers add router and expert hooks):")
    for name in first:
        click.echo(f"  {name}")


# --------------------------------------------------------------------------- interp plot

DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to Mary."


@cli.command("plot")
@model_argument()
@click.option("--text", default=DEFAULT_TEXT, show_default=True, help="The text to run.")
@click.option("--layer", type=int, default=None, help="Layer to plot [default: all].")
@click.option("--head", type=int, default=None, help="Head to plot (needs --layer).")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def plot_cmd(ctx: click.Context, model: str, text: str, layer: int | None, head: int | None,
             svg: bool, out: Path | None, batch_size: int, max_tokens: int | None,
             device: str, dtype: str, seed: int, quiet: bool, force: bool) -> None:
    """Plot attention patterns of MODEL on a text, as a small report.

    With --layer and --head: that head's pattern with every token labelled. With --layer
    only: a grid of that layer's heads. With neither: a layer x head overview grid (pick
    a head from it, then plot it alone). --max-tokens cuts the text to that many tokens.

    \b
    Example:
      interp plot --text "The cat sat on the mat." --out plots/cat
      interp plot minilm --text "The cat sat on the mat." --layer 2 --out plots/l2
      interp plot smollm2-135m --text "A B C A B" --layer 3 --head 0 --out plots/ind --svg
    """
    import numpy as np
    import pandas as pd

    from analyses.app import plots

    if head is not None and layer is None:
        raise click.BadParameter("--head needs --layer", param_hint="'--head'")
    if not text.strip():
        raise click.BadParameter("the text is empty", param_hint="'--text'")
    out = prepare_out(ctx, out, force)  # fail before the (slow) model load
    t0 = time.perf_counter()
    m = load_model(model, device, dtype, seed=seed)
    n_layers, n_heads = int(m.cfg.n_layers), int(m.cfg.n_heads)
    if layer is not None and not 0 <= layer < n_layers:
        raise click.BadParameter(
            f"layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})",
            param_hint="'--layer'")
    if head is not None and not 0 <= head < n_heads:
        raise click.BadParameter(
            f"head {head} is out of range: the model has {n_heads} heads (0-{n_heads - 1})",
            param_hint="'--head'")
    if getattr(m.cfg, "architecture", "decoder") == "encoder_decoder":
        raise CliError("interp plot supports decoder and encoder models; this one is "
                       "encoder-decoder (hook its encoder.{l}.attn.hook_pattern from Python)")
    tokens, str_tokens, note = _tokenize(m, text)
    tokens = tokens.to(m.device) if hasattr(m, "device") else tokens
    if max_tokens is not None and tokens.shape[-1] > max_tokens:
        tokens, str_tokens = tokens[..., :max_tokens], str_tokens[:max_tokens]
    import torch

    with torch.no_grad():
        _, cache = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    layers = [layer] if layer is not None else list(range(n_layers))
    pats = np.stack([cache["pattern", li][0].float().cpu().numpy() for li in layers])
    # pats: [layer, head, q, k]
    n_q, n_k = pats.shape[-2:]
    if len(str_tokens) != n_k:  # a tokenizer that adds specials to one and not the other
        str_tokens = [f"{i}" for i in range(n_k)]
    short = text if len(text) <= 60 else text[:57] + "..."
    figures: dict[str, Any] = {}
    if head is not None:
        figures[f"pattern_L{layer}H{head}"] = plots.head_pattern(
            pats[0, head], str_tokens, title=f"{model} L{layer}H{head}: {short!r}")
        scope = f"layer {layer}, head {head}"
    elif layer is not None:
        figures[f"pattern_L{layer}"] = plots.head_grid(
            pats[0], str_tokens, layer=layer, title=f"{model} layer {layer}: {short!r}")
        scope = f"layer {layer}, all {n_heads} heads"
    else:
        figures["pattern_all"] = plots.layer_head_grid(
            pats, str_tokens, title=f"{model}, every layer and head: {short!r}")
        scope = f"all {n_layers} layers x {n_heads} heads"
    heads = [head] if head is not None else list(range(pats.shape[1]))
    li, hi, qi, ki = np.meshgrid(np.arange(len(layers)), np.array(heads), np.arange(n_q),
                                 np.arange(n_k), indexing="ij")
    table = pd.DataFrame({
        "layer": np.array(layers)[li.ravel()],
        "head": hi.ravel(),
        "q": qi.ravel(),
        "k": ki.ravel(),
        "q_token": np.array(str_tokens, dtype=object)[qi.ravel()],
        "k_token": np.array(str_tokens, dtype=object)[ki.ravel()],
        "weight": pats[li.ravel(), hi.ravel(), qi.ravel(), ki.ravel()],
    })
    # The strongest non-trivial edges, in words: what a reader looks for first.
    top = table.sort_values("weight", ascending=False, kind="stable").head(5)
    findings = [
        f"L{r.layer}H{r.head}: query {r.q} {r.q_token!r} puts {r.weight:.2f} on key {r.k} "
        f"{r.k_token!r}" for r in top.itertuples()
    ]
    section = Section(
        key="plot",
        title=f"Attention patterns ({scope})",
        method=(
            "One forward pass with the attention pattern hooks cached "
            "(`blocks.{l}.attn.hook_pattern`, post-softmax, `[batch, head, q, k]`). Rows are "
            "queries (the attending token), columns keys. `␣` marks a leading space, `↵` a "
            "newline in a token."
        ),
        source=(
            "Attention-pattern visualisation as in Clark, Khandelwal, Levy and Manning (2019), "
            "*What Does BERT Look At? An Analysis of BERT's Attention*, BlackboxNLP; and "
            "Elhage et al. (2021), *A Mathematical Framework for Transformer Circuits*, "
            "Transformer Circuits Thread."
        ),
        data=f"The text given with `--text` ({n_k} tokens): `{text}`. {note}".strip(),
        findings=findings,
        tables={"patterns": table},
        figures=figures,
        timings={"total": time.perf_counter() - t0},
    )
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, svg=svg, quiet=quiet, title=f"interp plot: {model}")


# --------------------------------------------------------------------------- interp report


def _config_defaults(model: Any) -> dict[str, Any]:
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
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors or objects with odd __eq__
        return False


def overview_section(model: Any, source: str) -> Section:
    """The model section every report starts with: config, size, hook points."""
    import pandas as pd

    cfg = model_config(model)
    outside, first = _hook_names(model)
    defaults = _config_defaults(model)
    config_df = pd.DataFrame({
        "field": list(cfg),
        "value": [str(v) for v in cfg.values()],
        "default": [k in defaults and _same(defaults[k], v) for k, v in cfg.items()],
    })
    # Inline, only what this model sets (dozens of fields sit at their defaults); the CSV
    # has every field.
    chosen = config_df.loc[~config_df["default"], ["field", "value"]].reset_index(drop=True)
    n_params = _param_count(model)
    return Section(
        key="model",
        title=f"Model: {source}",
        method=("The model as loaded by `interp.load_pretrained`: its configuration (every "
                "architecture variant is a field) and its hook points."),
        source="TransformerLens hook naming (Nanda and Bloom, 2022, *TransformerLens*).",
        data="None: this section describes the model only.",
        findings=[
            f"{n_params:,} parameters",
            f"{len(getattr(model, 'hook_dict', {}))} hook points; layer 0 has {len(first)}: "
            + ", ".join(f"`{n}`" for n in first[:12]) + (" ..." if len(first) > 12 else ""),
        ],
        tables={"model_config": config_df, "model_config_set": chosen},
        show_tables={"model_config_set": len(chosen)} if len(chosen) else {},
    )


@cli.command("report")
@click.argument("model", required=False, default=None, metavar="[MODEL]")
@click.option("--only", multiple=True, metavar="KEY", help="Run only these sections.")
@click.option("--skip", multiple=True, metavar="KEY", help="Leave these sections out.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@click.option("--list", "list_sections", is_flag=True, help="List registered sections and exit.")
@common_options
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
      interp report smollm2-135m --only heads --only ffn --out reports/smol
      interp report --list
    """
    from analyses.app.sections import FAILED, select

    specs = select(only, skip)
    if list_sections:
        for spec in specs:
            click.echo(f"{spec.key:<10} {spec.title}  (default model: "
                       f"{spec.default_model or DEFAULT_MODEL})")
        for name, reason in sorted(FAILED.items()):
            click.echo(f"{name:<10} unavailable: {reason}")
        return
    out = prepare_out(ctx, out, force)  # fail before the (slow) model load
    device = resolve_device(device)
    models: dict[str, Any] = {}

    def get(source: str) -> Any:
        if source not in models:
            models[source] = load_model(source, device, dtype, seed=seed)
        return models[source]

    main_source = model or DEFAULT_MODEL
    sections = [overview_section(get(main_source), main_source)]
    opts = {"batch_size": batch_size, "max_tokens": max_tokens, "device": device,
            "dtype": dtype, "seed": seed, "quiet": quiet, "svg": svg}
    ran: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        source = model or spec.default_model or DEFAULT_MODEL
        m = get(source)
        if not spec.applies(m):
            skipped[spec.key] = f"does not apply to {source}"
            continue
        import torch

        torch.manual_seed(seed)
        t0 = time.perf_counter()
        section = spec.build(m, {**opts, "model_source": source}, progress_for(quiet))
        section.timings.setdefault("build", time.perf_counter() - t0)
        if len(models) > 1 or source != main_source:
            section.data = f"Model: `{source}`.\n\n{section.data}"
        sections.append(section)
        ran[spec.key] = source
    if len(sections) == 1 and not quiet:
        click.echo(f"note: no analysis section applies ({len(specs)} registered); "
                   "the report has the model overview only", err=True)
    sources = sorted(models)
    write_report(
        sections, out=out, force=force, model_source=", ".join(sources),
        model=models if len(models) > 1 else models[main_source], seed=seed, ctx=ctx,
        svg=svg, quiet=quiet, title=f"interp report: {', '.join(sources)}",
        extra={"sections_ran": ran, "sections_skipped": skipped,
               "topics_failed_to_import": dict(FAILED), "options": opts},
    )


if __name__ == "__main__":
    main()
