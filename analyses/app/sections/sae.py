"""``interp sae MODEL``: sparse autoencoders, ground truth first (toy model of superposition),
then one hook of MODEL (see :mod:`analyses.dictionary`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

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
from analyses.dictionary.sae import ARCHITECTURES, SAE
from analyses.dictionary.stream import StoreSplit
from interp.activation_store import ActivationStore
from interp.errors import InterpError
from interp.progress import Progress, progress_bar

if TYPE_CHECKING:
    from interp import HookedTransformer

METHOD = """\
**Ground truth.** A toy model of superposition (Elhage et al. 2022) squeezes n sparse features
(each 0 with probability S, else uniform on [0, 1]) into d < n dimensions, h = W x, and is
trained to read them back as ReLU(W^T h + b). The columns of W are the true feature
directions. An SAE of each architecture (2n features) is trained on h; for every true feature
the best cosine similarity to a decoder row is taken, and their mean over the features the toy
model represents (||W_i|| > 0.5) is the *mean max cosine similarity* (Sharkey et al. 2022).

**The model.** Activations at one hook are recorded over the text (first position of each
sequence left out: its norm is unlike the rest), an SAE or transcoder is trained on 80% of the
sequences and measured on the other 20%: L0 (active features per token), explained variance
1 - SSE / total variance, dead features (never active) and dense ones (active on > 10% of
tokens), and, for decoders, CE loss recovered = (CE_zero - CE_SAE) / (CE_zero - CE_clean)
with the SAE spliced in *without* its error term and the hook zero-ablated as the baseline.
Spliced with the error term kept, the model's logits are unchanged (tested bit for bit). Top
examples: each shown feature's strongest activations, with the tokens before it.

**From stored activations** (`--from-activations DIR`, written by `interp activations`): the
SAE trains on the rows of 4 in every 5 documents, streamed shard by shard in shuffled passes
(memory: two shards, whatever the store's size), each sequence's first position left out;
every 5th document is held out, and the statistics, frequencies and top examples are computed
on its stored rows. CE loss recovered runs the model on held-out sequences rebuilt from the
stored token ids (up to `--max-tokens`, default 4096)."""
SOURCE = """\
Elhage et al. 2022, *Toy Models of Superposition*. Sharkey, Braun & Millidge 2022, *Taking
features out of superposition with sparse autoencoders*. Bricken et al. 2023, *Towards
Monosemanticity* (ReLU + L1 SAEs, CE loss recovered). Gao et al. 2024, *Scaling and evaluating
sparse autoencoders* (TopK). Rajamanoharan et al. 2024, *Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU SAEs*. Dunefsky, Chlenski & Nanda 2024, *Transcoders
find interpretable LLM feature circuits*. File format: SAELens (Bloom et al. 2024)."""


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def _findings(toy: pd.DataFrame, stats: dict[str, float], hook: str, arch: str) -> list[str]:
    lines = [f"Toy model ({int(toy.n_features[0])} features in {int(toy.d_hidden[0])} dimensions, "
             f"{int(toy.represented[0])} represented): mean max cosine similarity of SAE decoder "
             "rows to the true directions is " + ", ".join(
                 f"{a} {_fmt(c)}" for a, c in zip(toy.architecture, toy.mean_max_cos,
                                                   strict=True)) + " (>= 0.9 means recovered)."]
    lines.append(f"{arch} SAE at `{hook}` ({int(stats['train_tokens'])} training tokens): L0 "
                 f"{stats['l0']:.1f}, explained variance {_fmt(stats['explained_variance'])}, "
                 f"dead features {stats['dead_fraction']:.1%}, dense (>10% of tokens) "
                 f"{stats['dense_fraction']:.1%}.")
    if "ce_recovered" in stats:
        lines.append(f"CE loss recovered {_fmt(stats['ce_recovered'])}: clean "
                     f"{stats['ce_clean']:.3f}, SAE spliced {stats['ce_spliced']:.3f}, hook "
                     f"zero-ablated {stats['ce_zero_ablated']:.3f} nats/token.")
    return lines


def build(model: HookedTransformer, opts: dict, progress: Progress) -> Section:
    """The SAE section: toy ground truth, then one hook of ``model``."""
    return run(model, opts, progress)[0]


def run(model: HookedTransformer, opts: dict, progress: Progress) -> tuple[Section, SAE]:
    """The section and the SAE it trained (or evaluated), for ``--save``."""
    from analyses.dictionary.study import model_study, store_study, toy_study
    from analyses.masking.data import load_sample_text

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    toy, recovery = toy_study(seed=opts["seed"], sae_steps=opts.get("toy_steps", 1500),
                              toy_steps=opts.get("toy_steps", 1500))
    timings["toy"] = time.perf_counter() - t0
    hook = opts.get("hook") or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    common = {"hook_name": hook, "hook_name_out": opts.get("hook_out"), "sae": opts.get("sae"),
              "architecture": opts.get("architecture", "topk"),
              "expansion": opts.get("expansion", 4), "k": opts.get("k", 32),
              "l1": opts.get("l1", 1.0), "steps": opts.get("steps", 1500),
              "batch_size": opts["batch_size"], "n_features": opts.get("n_features", 8),
              "seed": opts["seed"], "progress": progress}
    t0 = time.perf_counter()
    if opts.get("store") is not None:
        study = store_study(model, opts["store"], ce_tokens=opts.get("max_tokens") or 4096,
                            **common)
    else:
        text = opts.get("text")
        if text is None:
            text = load_sample_text()
            try:  # a toy vocabulary (the induction model's) cannot read English: its task data
                model.to_tokens(text[:200])
            except InterpError:
                text = None
        study = model_study(model, text, max_tokens=opts.get("max_tokens") or 4096, **common)
    timings["model"] = time.perf_counter() - t0
    stats = pd.DataFrame([{"hook": hook, **study.stats}])
    arch = study.sae.cfg.architecture
    findings = _findings(toy, study.stats, hook, arch) + study.notes
    tables = {"sae_toy_recovery": toy, "sae_toy_features": recovery, "sae_stats": stats,
              "sae_feature_frequency": study.frequencies, "sae_top_examples": study.examples}
    figures = {"sae_toy_recovery": plots.bars(
        recovery[recovery.represented], "true_feature", "max_cos", hue="architecture",
        title="Toy model: best cosine of an SAE feature to each true feature",
        ylabel="max cosine similarity")}
    if not study.history.empty:
        tables["sae_training"] = study.history
        figures["sae_training"] = plots.lines(
            study.history.melt("step", ["mse", "l0"], "metric"), "step", "value", hue="metric",
            title=f"Training at {hook}: relative MSE and L0", marker="")
    return Section(
        key="sae", title="Sparse autoencoders", method=METHOD, source=SOURCE,
        data=opts.get("text_name") or "The packaged 40-sentence English sample "
                                      "(`analyses/data/sample_text.txt`, written for this "
                                      "project).",
        findings=findings, tables=tables, figures=figures,
        show_tables={"sae_toy_recovery": 10, "sae_stats": 5, "sae_top_examples": 40},
        timings=timings, summary=findings[:3], summary_figure="sae_toy_recovery"), study.sae


def _check_width(model: HookedTransformer, sae: SAE, hook: str) -> None:
    """Raise the SAE's one-line width error if ``hook`` is not ``sae.cfg.d_in`` wide."""
    import torch

    with torch.no_grad():
        _, cache = model.run_with_cache(torch.ones(1, 2, dtype=torch.long, device=model.device),
                                        names_filter=[hook])
    sae.with_config(hook_name=hook)._check_width(cache[hook])


def _open_store(store_dir: Path | None, model: str, hook: str | None, hook_out: str | None,
                text_file: Path | None) -> tuple[ActivationStore | None, str | None]:
    """The store ``--from-activations`` names and the hook to read there, checked before the
    model loads: one line for a missing folder, another model's store, or a hook not stored."""
    if store_dir is None:
        return None, hook
    if text_file is not None:
        raise CliError("--text and --from-activations both give the data; pass one of them.")
    try:
        store = ActivationStore(store_dir)
    except InterpError as e:
        raise CliError(str(e)) from None
    wrote = store.index.get("source", {}).get("model")
    if wrote is not None and wrote != model:
        raise CliError(f"{store_dir} holds activations of {wrote}, not {model}; pass {wrote} as "
                       "MODEL or store this model's activations with `interp activations`.")
    if hook is None:
        choices = [h for h in store.hooks if h != hook_out]
        if len(choices) != 1:
            raise CliError(f"{store_dir} holds {', '.join(store.hooks)}; pick one with --hook.")
        hook = choices[0]
    try:
        StoreSplit(store, hook, hook_out)
    except InterpError as e:
        raise CliError(str(e)) from None
    return store, hook


def _store_name(store: ActivationStore) -> str:
    """The report's data line for a store: its folder, size and what it was written from."""
    src = store.index.get("source", {})
    corpus = f", corpus sha256 {str(src['corpus_sha256'])[:12]}" if "corpus_sha256" in src else ""
    return (f"Activations stored by `interp activations` in `{store.path.name}`: "
            f"{store.n_tokens:,} tokens in {len(store.shards)} shards, sequences of "
            f"{store.index['seq_len']} tokens{corpus}.")


@cli.command("sae")
@model_argument()
@click.option("--hook", default=None, metavar="NAME",
              help="Hook the SAE reads [default: blocks.{n_layers//2}.hook_resid_post].")
@click.option("--hook-out", default=None, metavar="NAME",
              help="Train a transcoder writing this hook (e.g. blocks.3.hook_mlp_out).")
@click.option("--architecture", type=click.Choice(ARCHITECTURES), default="topk",
              show_default=True, help="relu (+L1), topk or jumprelu.")
@click.option("--expansion", type=click.IntRange(min=1), default=4, show_default=True,
              help="Features per input dimension.")
@click.option("--k", type=click.IntRange(min=1), default=32, show_default=True,
              help="Active features per token (topk).")
@click.option("--l1", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Sparsity weight (relu).")
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Training steps (batches of 512 tokens).")
@click.option("--load", "load_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Evaluate this SAELens folder instead of training.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Also save the SAE here in SAELens' format.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Text file [default: the packaged English sample].")
@click.option("--from-activations", "store_dir",
              type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Train from activations stored by `interp activations` (streamed from "
                   "disk; every 5th document held out) instead of reading --text.")
@click.option("--svg", is_flag=True, help="Also write SVG figures.")
@common_options
@click.pass_context
def sae_cmd(ctx: click.Context, model: str, hook: str | None, hook_out: str | None,
            architecture: str, expansion: int, k: int, l1: float, steps: int,
            load_dir: Path | None, save_dir: Path | None, text_file: Path | None,
            store_dir: Path | None, svg: bool, out: Path | None, batch_size: int,
            max_tokens: int | None, device: str, dtype: str, seed: int, quiet: bool,
            force: bool) -> None:
    """Train a sparse autoencoder (or transcoder) on one hook of MODEL and report it, after
    the ground-truth check on a toy model of superposition.

    \b
    Example:
      interp sae interp/data/induction.pt --hook blocks.1.hook_resid_post --steps 300 \\
          --out reports/sae_induction
      interp sae smollm2-135m --hook blocks.10.hook_resid_post --steps 300 \\
          --save reports/sae_smol_l10 --out reports/sae_smol
      interp activations minilm --hooks blocks.3.hook_resid_post \\
          --corpus analyses/data/sample_text.txt --out acts_l3
      interp sae minilm --from-activations acts_l3 --out reports/sae_store
    """
    from analyses.dictionary.saelens_format import load_saelens, save_saelens

    try:
        sae = load_saelens(load_dir) if load_dir is not None else None
    except InterpError as e:
        raise CliError(str(e)) from None
    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            raise CliError(f"--text {text_file}: not a readable UTF-8 text file") from None
    if sae is not None and hook is None:
        hook = sae.cfg.hook_name or None
    store, hook = _open_store(store_dir, model, hook, hook_out, text_file)
    out = prepare_out(ctx, out, force)
    m = load_model(model, device, dtype, seed=seed)
    try:
        if hook is not None or hook_out is not None:
            m.check_hook_names([h for h in (hook, hook_out) if h])
        if sae is not None and hook is not None:
            _check_width(m, sae, hook)  # before the toy study: fail in a second, not a minute
        section, trained = run(m, {"seed": seed, "batch_size": batch_size, "max_tokens": max_tokens,
                            "hook": hook, "hook_out": hook_out, "architecture": architecture,
                            "expansion": expansion, "k": k, "l1": l1, "steps": steps,
                            "sae": sae, "text": text, "store": store,
                            "text_name": (_store_name(store) if store is not None else
                                          f"`{text_file.name}`" if text_file else None)},
                        progress_bar(quiet))
    except InterpError as e:
        raise CliError(str(e)) from None
    write_report([section], out=out, force=force, model_source=model, model=m, seed=seed,
                 ctx=ctx, svg=svg, quiet=quiet, title=f"interp sae: {model}")
    if save_dir is not None:
        click.echo(str(save_saelens(trained, save_dir)))
