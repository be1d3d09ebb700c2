"""The trainer: AdamW, warm-up + cosine decay, gradient clipping, MoE losses, resumable.

Determinism: ``torch.manual_seed(seed)`` before the model is built (initial weights) and a
separate ``torch.Generator`` seeded with ``seed`` for the data, so the same seed, task, config
and thread count reproduce the same weights bit for bit; a run resumed from a checkpoint
continues the same data stream and optimizer state, so it ends where the uninterrupted run
would (within floating-point reassociation of a different thread count).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from interp.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from interp.config import ModelConfig
from interp.errors import InterpError
from interp.tokenizers import tokenizer_to_dict
from interp.train.tasks import Task, make_task

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; a task's ``train_defaults`` fill the ones you leave unset.

    ``lr`` peaks after ``warmup_steps`` of linear warm-up, then follows a cosine down to
    ``min_lr_ratio * lr`` at ``steps`` (Loshchilov & Hutter 2017). AdamW decays only matrices
    (``ndim >= 2``), not biases or norm gains. ``grad_clip`` bounds the global gradient norm.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    label_smoothing: float = 0.0  # keeps memorised answers off probability 1 (Szegedy et al. 2016)
    seed: int = 0
    log_every: int = 10  # history rows (and progress-bar updates) every this many steps
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: save only at the end (needs out=)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InterpError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InterpError(f"{name} must be an integer >= 0, got {v!r}.")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                    or v <= 0):
                raise InterpError(f"{name} must be a positive number, got {v!r}.")
        for name in ("min_lr_ratio", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise InterpError(f"{name} must be between 0 and 1, got {v!r}.")
        v = self.label_smoothing
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
            raise InterpError(f"label_smoothing must be in [0, 1), got {v!r}.")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_at(self, step: int) -> float:
        """Learning rate for (0-based) ``step``: linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.lr * (self.min_lr_ratio
                          + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


class TrainResult(NamedTuple):
    """What :func:`train` returns: ``model, history, metrics = train(...)``.

    ``history`` is a pandas DataFrame, one row per ``log_every`` steps: ``step, loss`` (task
    loss, mean over the logged steps), ``aux_loss`` (weighted MoE losses), ``lr, grad_norm,
    elapsed_s``. ``metrics`` is the task's :meth:`~interp.train.tasks.Task.evaluate` at the end
    plus ``wall_time_s`` and ``steps``.
    """

    model: Any
    history: Any
    metrics: dict[str, Any]


def _make_config(task: Task, model_config: ModelConfig | dict | None) -> ModelConfig:
    if isinstance(model_config, ModelConfig):
        cfg = model_config
    elif model_config is None or isinstance(model_config, dict):
        cfg = task.model_config(model_config)
    else:
        raise InterpError("model_config must be a ModelConfig, a dict of fields or None, "
                          f"got {type(model_config).__name__}.")
    task.check_config(cfg)
    extra = {**cfg.extra, "task": task.describe()}
    return dataclasses.replace(cfg, extra=extra)


def _make_train_config(task: Task, train_config: TrainConfig | dict | None,
                       overrides: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InterpError(f"Unknown training option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(names))}.")
    if isinstance(train_config, TrainConfig):
        base = train_config.to_dict()
    elif train_config is None or isinstance(train_config, dict):
        base = {**task.train_defaults, **(train_config or {})}
    else:
        raise InterpError("train_config must be a TrainConfig, a dict or None, "
                          f"got {type(train_config).__name__}.")
    bad = sorted(set(base) - names)
    if bad:
        raise InterpError(f"Unknown training option(s) {', '.join(bad)}; "
                          f"valid: {', '.join(sorted(names))}.")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return TrainConfig(**merged)


def _optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    params = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas)


def _scale_embeddings_for_sinusoidal(model: Any) -> None:
    """Give token embeddings the norm of the fixed sinusoidal table they are added to.

    A sinusoidal row has norm sqrt(d_model / 2) while N(0, init_std=0.02) token embeddings
    have norm ~0.02 sqrt(d_model): the sum is almost pure position, and after the first
    LayerNorm the tokens are hard to tell apart (training stalls). Vaswani et al. (2017,
    section 3.4) multiply embeddings by sqrt(d_model) for the same reason; we initialise
    W_E with std sqrt(1/2) instead, which gives both the same expected norm.
    """
    if model.cfg.positional == "sinusoidal":
        with torch.no_grad():
            model.embed.W_E.normal_(std=math.sqrt(0.5))


def _versions() -> dict[str, str]:
    import interp

    return {"interp": str(interp.__version__), "torch": str(torch.__version__),
            "python": sys.version.split()[0]}


def train(
    task: str | Task,
    model_config: ModelConfig | dict | None = None,
    train_config: TrainConfig | dict | None = None,
    *,
    task_params: dict[str, Any] | None = None,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    save_optimizer: bool = True,
    evaluate: bool = True,
    command: str | None = None,
    **options: Any,
) -> TrainResult:
    """Train a small model on a task with a known mechanism; return ``(model, history, metrics)``.

    ``task``: ``"induction"``, ``"knowledge"``, ``"domains"``, ``"text"`` or a
    :class:`~interp.train.tasks.Task`; ``task_params`` are its parameters (e.g.
    ``{"path": "book.txt"}`` for ``text``). ``model_config``: a full ModelConfig, or a dict of
    fields applied over the task's default (``{"positional": "rope"}``), or None for the
    default. ``train_config`` / ``**options``: :class:`TrainConfig` fields (``steps=200,
    seed=1, lr=3e-3``...), over the task's defaults. ``out``: write the checkpoint there (and
    every ``save_every`` steps); ``resume``: continue from a checkpoint written by ``out``
    (same task; ``steps`` may be raised). ``save_optimizer=False`` writes a smaller file that
    cannot resume. ``evaluate=False`` skips the final task evaluation (``metrics`` then holds
    only ``wall_time_s`` and ``steps``). Progress goes to a tqdm bar on stderr unless ``quiet``.

    >>> from interp.train import train
    >>> model, history, metrics = train("induction", {"d_model": 32}, steps=5, quiet=True)
    >>> list(history.columns)[:3]
    ['step', 'loss', 'aux_loss']
    """
    import pandas as pd

    state: dict[str, Any] | None = None
    if resume is not None:
        state = read_checkpoint(resume, mmap=False)
        task, tc, cfg = _resumed_setup(state, resume, task, model_config, train_config,
                                       task_params, options)
    else:
        task = make_task(task, **(task_params or {}))
        tc = _make_train_config(task, train_config, options)
        cfg = _make_config(task, model_config)

    device = torch.device(tc.device)
    torch.manual_seed(tc.seed)
    model = _initial_model(task, cfg, state, device)
    opt = _optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    start, history, elapsed0 = 0, [], 0.0
    if state is not None:
        start, history, elapsed0 = _restore(state, opt, gen, tc)
    run = _Run(model, task, tc, opt, gen, history, save_optimizer, command)

    t0 = time.perf_counter()
    eval_rows = _loop(run, start, device, out=out, quiet=quiet, t0=t0, elapsed0=elapsed0)
    wall = elapsed0 + time.perf_counter() - t0
    model.eval()
    metrics = {**(task.evaluate(model) if evaluate else {}), "wall_time_s": wall, "steps": tc.steps}
    if eval_rows:
        metrics["evals"] = eval_rows
    if out is not None:
        write_checkpoint(out, run.payload(tc.steps, metrics, wall))
    columns = ["step", "loss", "aux_loss", "lr", "grad_norm", "elapsed_s"]
    return TrainResult(model, pd.DataFrame(history, columns=columns), metrics)


def _resumed_setup(state: dict[str, Any], resume: str | Path, task: str | Task,
                   model_config: ModelConfig | dict | None,
                   train_config: TrainConfig | dict | None, task_params: dict[str, Any] | None,
                   options: dict[str, Any]) -> tuple[Task, TrainConfig, ModelConfig]:
    """The task, train config and model config of a run resumed from checkpoint ``state``,
    refusing what would not continue the same run (another task, no optimizer state, a new
    model config)."""
    stored = state.get("task") or {}
    name = task.name if isinstance(task, Task) else task
    if stored.get("name") != name:
        raise InterpError(f"Checkpoint {str(resume)!r} was trained on task "
                          f"{stored.get('name')!r}, not {name!r}.")
    if state.get("optimizer") is None:
        raise InterpError(f"Checkpoint {str(resume)!r} has no optimizer state (saved without "
                          "it); it cannot be resumed.")
    if not isinstance(task, Task):
        task = make_task(name, **{**stored.get("params", {}), **(task_params or {})})
    if model_config is not None:
        raise InterpError("A resumed run keeps its checkpoint's model config; do not pass "
                          "model_config with resume.")
    extra = train_config if isinstance(train_config, dict) else {}
    base = {**state["train"]["train_config"], **extra}
    tc = _make_train_config(task, base, options)
    cfg = ModelConfig.from_dict(state["config"])
    task.check_config(cfg)
    return task, tc, cfg


def _initial_model(task: Task, cfg: ModelConfig, state: dict[str, Any] | None,
                   device: torch.device) -> Any:
    """The model to train, in train mode: the checkpoint's when resuming, else a fresh one."""
    if state is not None:
        model = model_from_checkpoint(state, device)
    else:
        from interp.model import build_model

        model = build_model(cfg, tokenizer=task.tokenizer)
        _scale_embeddings_for_sinusoidal(model)
        model = model.to(device)
    model.tokenizer = task.tokenizer
    model.train()
    return model


def _restore(state: dict[str, Any], opt: torch.optim.Optimizer, gen: torch.Generator,
             tc: TrainConfig) -> tuple[int, list[dict[str, Any]], float]:
    """Put the optimizer and both RNGs back where the checkpoint left them; return the step,
    the history so far and the elapsed time to continue from."""
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"]["data"])
    torch.set_rng_state(state["rng"]["torch"])
    start = int(state["train"]["step"])
    history = list(state["train"].get("history", []))
    elapsed0 = float(state["train"].get("wall_time_s", 0.0))
    if start >= tc.steps:
        raise InterpError(f"Checkpoint is already at step {start} of {tc.steps}; pass a larger "
                          "steps to train further.")
    return start, history, elapsed0


class _Run(NamedTuple):
    """What a training run's steps and checkpoints share."""

    model: Any
    task: Task
    tc: TrainConfig
    opt: torch.optim.Optimizer
    gen: torch.Generator
    history: list[dict[str, Any]]
    save_optimizer: bool
    command: str | None

    def payload(self, step: int, metrics: dict[str, Any] | None, wall: float) -> dict[str, Any]:
        """The checkpoint of this run at ``step`` (see :mod:`interp.checkpoint`)."""
        tc = self.tc
        return {
            "config": self.model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "tokenizer": tokenizer_to_dict(self.task.tokenizer),
            "task": self.task.describe(),
            "train": {"step": step, "steps": tc.steps, "seed": tc.seed,
                      "train_config": tc.to_dict(), "history": self.history,
                      "metrics": metrics or {}, "wall_time_s": wall,
                      "threads": torch.get_num_threads(), "versions": _versions(),
                      "command": self.command},
            "optimizer": self.opt.state_dict() if self.save_optimizer else None,
            "rng": {"data": self.gen.get_state(), "torch": torch.get_rng_state()},
        }


def _step(run: _Run, step: int, acc: dict[str, float], device: torch.device) -> float:
    """One optimisation step (sums its loss, aux loss and gradient norm into ``acc``);
    returns its learning rate."""
    model, tc, opt = run.model, run.tc, run.opt
    lr = tc.lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr
    batch = run.task.sample(tc.batch_size, run.gen)
    tokens, labels = batch.tokens.to(device), batch.labels.to(device)
    logits = run.task.forward(model, tokens)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=tc.label_smoothing)
    moe = model.moe_losses()
    aux = moe["aux"] + moe["z"]
    opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    acc["loss"] += float(loss.detach())
    acc["aux"] += float(aux.detach())
    acc["gn"] += float(gn)
    acc["n"] += 1
    return lr


def _loop(run: _Run, start: int, device: torch.device, *, out: str | Path | None, quiet: bool,
          t0: float, elapsed0: float) -> list[dict[str, Any]]:
    """Steps ``start`` .. ``steps``: history rows every ``log_every`` steps, evaluations every
    ``eval_every``, checkpoints every ``save_every`` (the final ones are the caller's); returns
    the intermediate evaluations."""
    from tqdm.auto import tqdm

    model, task, tc, history = run.model, run.task, run.tc, run.history
    bar = tqdm(total=tc.steps, initial=start, desc=f"train {task.name}", disable=quiet,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    acc = {"loss": 0.0, "aux": 0.0, "gn": 0.0, "n": 0}
    eval_rows: list[dict[str, Any]] = []
    try:
        for step in range(start, tc.steps):
            lr = _step(run, step, acc, device)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                n = acc["n"]
                row = {"step": done, "loss": acc["loss"] / n, "aux_loss": acc["aux"] / n,
                       "lr": lr, "grad_norm": acc["gn"] / n,
                       "elapsed_s": elapsed0 + time.perf_counter() - t0}
                history.append(row)
                acc = {"loss": 0.0, "aux": 0.0, "gn": 0.0, "n": 0}
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}", refresh=False)
                bar.update(n)
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                model.eval()
                eval_rows.append({"step": done, **task.evaluate(model)})
                model.train()
            if out is not None and tc.save_every and done % tc.save_every == 0 and done != tc.steps:
                write_checkpoint(out, run.payload(done, None, elapsed0 + time.perf_counter() - t0))
    finally:
        bar.close()
    return eval_rows
