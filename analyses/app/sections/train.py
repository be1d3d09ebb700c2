"""``interp train TASK``: train a small model with a known mechanism (see :mod:`interp.train`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from analyses.app.cli import CliError, cli

# Named --config presets: ModelConfig fields applied over the task's default config.
PRESETS: dict[str, dict[str, Any]] = {
    "attn-only": {"attn_only": True, "n_experts": 0},
    "dense": {"attn_only": False, "n_experts": 0},
    "moe": {"attn_only": False, "n_experts": 8, "experts_per_token": 2},
    "tiny": {"d_model": 32, "n_heads": 2},
}


def parse_config(values: tuple[str, ...]) -> dict[str, Any]:
    """Merge ``--config`` values in order: preset names, JSON files, or inline JSON objects."""
    merged: dict[str, Any] = {}
    for value in values:
        if value in PRESETS:
            merged.update(PRESETS[value])
            continue
        text = value
        if not value.lstrip().startswith("{"):
            path = Path(value).expanduser()
            if not path.is_file():
                raise CliError(f"--config {value!r} is neither a preset ({', '.join(PRESETS)}), "
                               "a JSON file, nor an inline JSON object")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CliError(f"--config {value!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise CliError(f"--config {value!r} must be a JSON object of ModelConfig fields")
        merged.update(data)
    return merged


def parse_task_params(items: tuple[str, ...]) -> dict[str, Any]:
    """``--param KEY=VALUE`` pairs; values are JSON when they parse (numbers), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--param {item!r} must look like KEY=VALUE (e.g. n_subjects=100)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@cli.command("train")
@click.argument("task", metavar="TASK")
@click.option("--config", "configs", multiple=True, metavar="PRESET|JSON|FILE",
              help=f"Model config over the task's default: a preset ({', '.join(PRESETS)}), "
                   "a JSON file or an inline JSON object of ModelConfig fields; repeatable, "
                   "applied in order.")
@click.option("--positional", default=None, help="Position encoding (overrides --config).",
              type=click.Choice(["none", "sinusoidal", "learned", "rope", "alibi", "relative"]))
@click.option("--n-experts", type=click.IntRange(min=0), default=None,
              help="Experts per FFN layer (0 = dense; > 0 also turns attention-only off).")
@click.option("--top-k", "experts_per_token", type=click.IntRange(min=1), default=None,
              help="Experts per token.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Task parameter, e.g. --param n_subjects=100 (see the task's docstring); "
                   "repeatable.")
@click.option("--text-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Task 'text': the UTF-8 text file to train on.")
@click.option("--tokenizer", type=click.Choice(["bytes", "gpt2"]), default=None,
              help="Task 'text': UTF-8 bytes (vocabulary 257) or GPT-2 BPE (offline files).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps [default: the task's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Sequences per step [default: the task's].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate [default: the task's].")
@click.option("--seed", type=int, default=None,
              help="Seed for initial weights and data order [default: 0; a resumed run keeps its "
                   "own].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint to write [default: checkpoints/<task>.pt].")
@click.option("--resume", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Continue a checkpoint written with optimizer state (same task; "
                                 "--steps may be larger).")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also save every N steps, so an interrupted run can --resume.")
@click.option("--no-optimizer-state", is_flag=True,
              help="Smaller file without optimizer state (cannot resume).")
@click.option("--device", default="cpu", show_default=True,
              help='Torch device: "cpu", "cuda", "cuda:1", ...')
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch threads (0 = torch's default).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--span-coef", type=click.FloatRange(min=0), default=None,
              help="Learned attention spans (Sukhbaatar et al. 2019) with this L1 penalty.")
@click.option("--l0-coef", type=click.FloatRange(min=0), default=None,
              help="Hard-concrete head gates (Voita et al. 2019) with this L0 penalty.")
@click.option("--prune", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="Add the learned masks to this trained checkpoint of TASK and "
                                 "train only them (weights frozen), e.g. to prune heads.")
def train_cmd(task: str, configs: tuple[str, ...], positional: str | None, n_experts: int | None,
              experts_per_token: int | None, params: tuple[str, ...], text_file: Path | None,
              tokenizer: str | None, steps: int | None, batch_size: int | None, lr: float | None,
              seed: int, out: Path | None, resume: Path | None, save_every: int,
              no_optimizer_state: bool, device: str, threads: int, force: bool,
              quiet: bool, span_coef: float | None, l0_coef: float | None, prune: Path | None
              ) -> None:
    """Train a small model on TASK, a task with a known mechanism, and save a .pt checkpoint.

    \b
    TASK is one of:
      induction  [BOS] x1..xn x1..xn: previous-token + induction heads (Olsson et al. 2022)
      knowledge  synthetic subject-relation-object facts, memorised (Geva 2021; Meng 2022)
      domains    several token domains in one stream, for MoE experts (Fedus et al. 2021)
      text       a small LM on --text-file (bytes or GPT-2 BPE)
      offsets    answer the tokens 2, 5 and 10 back: one head per offset (use --span-coef)

    The checkpoint holds config, weights, vocabulary, task parameters, training history
    and metrics (and optimizer state, for --resume); any interp command loads it as MODEL.
    Training is deterministic given --seed (and the thread count). When the trained model
    lacks the task's mechanism (induction: score < 0.70), one "warning:" line says so.

    \b
    Example:
      interp train induction --out induction.pt
      interp train induction --positional rope --steps 3000 --seed 1 --out ind_rope.pt
      interp train knowledge --param n_subjects=100 --out kb.pt
      interp train domains --config moe --n-experts 8 --top-k 2 --out moe.pt
      interp train text --text-file analyses/data/sample_text.txt --tokenizer bytes --steps 2000 \\
          --out sample.pt
      interp train induction --steps 6000 --resume induction.pt --out induction.pt --force
      interp train offsets --span-coef 0.3 --steps 1500 --out offsets_span.pt
      interp train induction --prune interp/data/induction.pt --l0-coef 0.3 --lr 0.05 --out g.pt
    """
    import torch

    from interp.errors import InterpError
    from interp.train import TASKS

    if task not in TASKS:
        raise CliError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    task_params = _task_params(task, params, text_file, tokenizer)
    overrides = parse_config(configs)
    if positional is not None:
        overrides["positional"] = positional
    if n_experts is not None:
        overrides["n_experts"] = n_experts
        if n_experts:
            overrides["attn_only"] = False
    if experts_per_token is not None:
        overrides["experts_per_token"] = experts_per_token
    out = _check_out(out if out is not None else Path("checkpoints") / f"{task}.pt", resume, force)
    if resume is not None and (overrides or params):
        raise CliError("--resume keeps the checkpoint's model config and task; drop "
                       "--config/--positional/--n-experts/--param")
    if threads:
        torch.set_num_threads(threads)
    if seed is None and resume is None:
        seed = 0
    command = " ".join(click.get_current_context().meta.get("interp.argv", [])) or None
    run = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, out=out, command=command)
    masks, plain = {"prune": prune, "span_coef": span_coef, "l0_coef": l0_coef}, dict(
        resume=resume, quiet=quiet, save_optimizer=not no_optimizer_state, save_every=save_every,
        device=device)
    try:
        model, history, metrics = _dispatch(task, overrides, task_params, masks, plain, run)
    except InterpError as e:
        raise CliError(str(e)) from None
    shown = {k: v for k, v in metrics.items()
             if isinstance(v, float | int) and not isinstance(v, bool)}
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in shown.items())
    if not quiet:
        click.echo(f"{task}: {model.param_count():,} parameters; {summary}", err=True)
    if isinstance(metrics.get("warning"), str):
        # the task's own check (e.g. induction score < 0.70), also recorded in the checkpoint's
        # train.metrics; shown even with --quiet: the file was written but lacks the mechanism
        click.echo(f"warning: {metrics['warning']}", err=True)
    click.echo(str(out))


def _dispatch(task: str, overrides: dict[str, Any], task_params: dict[str, Any],
              masks: dict[str, Any], plain: dict[str, Any], run: dict[str, Any]) -> Any:
    """:func:`interp.train.train`, or with ``--span-coef`` / ``--l0-coef`` / ``--prune``
    learned-mask training (:func:`interp.train.learned.train_learned_masks`)."""
    from interp.train import train
    from interp.train.learned import train_learned_masks

    if all(v is None for v in masks.values()):
        return train(task, overrides or None, task_params=task_params or None, **plain, **run)
    if plain["resume"] is not None:
        raise CliError("--resume continues plain training; drop --span-coef/--l0-coef/--prune")
    return train_learned_masks(task, overrides or None, task_params=task_params or None,
                               prune=masks["prune"], span_coef=masks["span_coef"] or 0.0,
                               l0_coef=masks["l0_coef"] or 0.0, **run)


def _task_params(task: str, params: tuple[str, ...], text_file: Path | None,
                 tokenizer: str | None) -> dict[str, Any]:
    """``--param`` pairs, plus ``--text-file``/``--tokenizer`` (which only the text task takes)."""
    task_params = parse_task_params(params)
    if text_file is not None or tokenizer is not None:
        if task != "text":
            raise CliError("--text-file and --tokenizer apply only to the 'text' task")
        if text_file is not None:
            task_params["path"] = str(text_file)
        if tokenizer is not None:
            task_params["tokenizer"] = tokenizer
    return task_params


def _check_out(out: Path, resume: Path | None, force: bool) -> Path:
    """Refuse, before training, a checkpoint path that is not a .pt file or would overwrite one
    without ``--force`` (resuming into the same file is allowed)."""
    if out.suffix != ".pt":
        raise CliError(f"--out {str(out)!r} must end in .pt")
    same_file = resume is not None and out.expanduser().resolve() == resume.expanduser().resolve()
    if out.exists() and not force and not same_file:
        raise CliError(f"{out} already exists; use --force to replace it")
    if out.exists() and out.is_dir():
        raise CliError(f"{out} is a folder; --out must be a .pt file path")
    return out
