"""Train learned masks into a checkpoint: spans and gates from scratch, or gates that prune.

Two ways, both with :func:`~interp.train.tasks.mask_training.fit_learned_masks` (Adam, the task
loss plus ``span_coef`` x the L1 span loss of Sukhbaatar et al. 2019 and ``l0_coef`` x the
expected number of open gates, Louizos et al. 2018 / Voita et al. 2019):

- **from scratch** (``prune=None``): a fresh model of the task's config with
  ``adaptive_span`` (when ``span_coef > 0``) and ``l0_head_gates`` (when ``l0_coef > 0``),
  weights and masks trained together; e.g. the ``offsets`` task, where each planted offset
  needs one head and the span penalty shrinks each head's span to the offset it serves;
- **pruning** (``prune=CHECKPOINT``): a trained checkpoint gets gates (and/or spans) at their
  neutral initial values and only the masks train (``masks_only``): how Voita et al. measure
  which heads a trained model can lose. Its metrics hold the task's evaluation before
  (``before_*``) and after, and ``heldout_loss_before`` / ``heldout_loss`` on 4 x 32 fresh
  batches of the task.

The checkpoint has the training layout of :mod:`interp.checkpoint` (task, train.history,
train.metrics), so ``interp masking`` lists its learned spans and gates.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from interp.checkpoint import model_from_checkpoint, read_checkpoint, write_checkpoint
from interp.errors import InterpError
from interp.tokenizers import tokenizer_to_dict
from interp.train.tasks import Task, make_task
from interp.train.tasks.mask_training import fit_learned_masks, with_learned_masks
from interp.train.trainer import TrainResult

__all__ = ["train_learned_masks"]


@torch.no_grad()
def heldout_loss(model: Any, task: Task, seed: int = 1, n_batches: int = 4,
                 batch_size: int = 32) -> float:
    """Mean task loss (the trainer's cross-entropy) on fresh seeded batches."""
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    total = 0.0
    for _ in range(n_batches):
        b = task.sample(batch_size, gen)
        logits = model(b.tokens.to(dev)).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), b.labels.to(dev).flatten(),
                                       ignore_index=-100))
    return total / n_batches


@torch.no_grad()
def mask_metrics(model: Any) -> dict[str, Any]:
    """Spans (``span_L{l}H{h}``) and evaluation gates (``gate_L{l}H{h}``) per head, and
    ``n_pruned`` / ``n_heads`` (gates exactly 0)."""
    out: dict[str, Any] = {}
    pruned = 0
    for layer, blk in enumerate(model.blocks):
        attn = blk.attn
        if attn.span is not None:
            for h, z in enumerate(attn.span.spans.tolist()):
                out[f"span_L{layer}H{h}"] = float(z)
        if attn.gates is not None:
            was = attn.gates.training
            attn.gates.eval()
            for h, g in enumerate(attn.gates().tolist()):
                out[f"gate_L{layer}H{h}"] = float(g)
                pruned += int(g == 0.0)
            attn.gates.train(was)
    out["n_pruned"] = pruned
    out["n_heads"] = model.cfg.n_layers * model.cfg.n_heads
    return out


def _flags(span_coef: float, l0_coef: float) -> dict[str, bool]:
    for name, v in (("span_coef", span_coef), ("l0_coef", l0_coef)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise InterpError(f"{name} must be a number >= 0, got {v!r}.")
    if span_coef == 0 and l0_coef == 0:
        raise InterpError("Learned-mask training needs span_coef > 0 (adaptive spans) or "
                          "l0_coef > 0 (head gates).")
    return {k: True for k, on in (("adaptive_span", span_coef > 0),
                                  ("l0_head_gates", l0_coef > 0)) if on}


def _setup(task: str | Task, model_config: dict[str, Any] | None,
           task_params: dict[str, Any] | None, prune: str | Path | None, flags: dict[str, bool],
           seed: int) -> tuple[Task, Any, Any]:
    """(task, model to train, the pruned checkpoint's plain model or None)."""
    from interp.model import build_model

    if prune is None:
        task = make_task(task, **(task_params or {}))
        cfg = task.model_config({**(model_config or {}), **flags})
        # the task record that interp.train.task_from and the analyses read, as train() stores
        cfg = dataclasses.replace(cfg, extra={**cfg.extra, "task": task.describe()})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg, tokenizer=task.tokenizer)
        return task, model, None
    if model_config or task_params:
        raise InterpError("Pruning keeps the checkpoint's model config and task; drop the "
                          "model config and task parameters.")
    state = read_checkpoint(prune, mmap=False)
    stored = state.get("task") or {}
    name = task.name if isinstance(task, Task) else task
    if stored.get("name") != name:
        raise InterpError(f"Checkpoint {str(prune)!r} was trained on task "
                          f"{stored.get('name')!r}, not {name!r}.")
    task = make_task(name, **stored.get("params", {}))
    plain = model_from_checkpoint(state).eval()
    plain.tokenizer = task.tokenizer
    return task, with_learned_masks(plain, **flags), plain


# Long because it is one recipe read top to bottom: set up, measure, fit, measure, save.
def train_learned_masks(
    task: str | Task,
    model_config: dict[str, Any] | None = None,
    *,
    task_params: dict[str, Any] | None = None,
    prune: str | Path | None = None,
    span_coef: float = 0.0,
    l0_coef: float = 0.0,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train learned masks on ``task`` (see the module docstring); ``steps``, ``batch_size``
    and ``lr`` default to the task's ``train_defaults``. Returns ``(model, history, metrics)``
    like :func:`interp.train.train`; ``out`` writes the checkpoint.

    >>> from interp.train.learned import train_learned_masks
    >>> m, h, met = train_learned_masks("offsets", {"d_model": 32}, span_coef=0.3, steps=3)
    >>> m.cfg.adaptive_span, list(h.columns)[:2]
    (True, ['step', 'loss'])
    """
    flags = _flags(span_coef, l0_coef)
    task, model, plain = _setup(task, model_config, task_params, prune, flags, seed)
    defaults = task.train_defaults
    steps = steps if steps is not None else int(defaults.get("steps", 1000))
    batch_size = batch_size if batch_size is not None else int(defaults.get("batch_size", 32))
    lr = lr if lr is not None else float(defaults.get("lr", 1e-3))
    before: dict[str, Any] = {}
    if plain is not None:
        before = {f"before_{k}": v for k, v in task.evaluate(plain).items()
                  if isinstance(v, int | float) and not isinstance(v, bool)}
        before["heldout_loss_before"] = heldout_loss(plain, task)
    t0 = time.perf_counter()
    history = fit_learned_masks(model, task, steps=steps, batch_size=batch_size, lr=lr,
                                span_coef=span_coef, l0_coef=l0_coef,
                                masks_only=plain is not None, seed=seed, log_every=10)
    wall = time.perf_counter() - t0
    model.eval()
    metrics = {**task.evaluate(model), **before, "heldout_loss": heldout_loss(model, task),
               **mask_metrics(model), "wall_time_s": wall, "steps": steps}
    if out is not None:
        write_checkpoint(out, _payload(model, task, history, metrics, steps, seed, batch_size,
                                       lr, span_coef, l0_coef, prune, command))
    return TrainResult(model, history, metrics)


def _payload(model: Any, task: Task, history: Any, metrics: dict[str, Any], steps: int,
             seed: int, batch_size: int, lr: float, span_coef: float, l0_coef: float,
             prune: str | Path | None, command: str | None) -> dict[str, Any]:
    """The checkpoint (training layout of :mod:`interp.checkpoint`, no optimizer state)."""
    import interp

    versions = {"interp": str(interp.__version__), "torch": str(torch.__version__),
                "python": sys.version.split()[0]}
    config = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "span_coef": span_coef, "l0_coef": l0_coef, "masks_only": prune is not None,
              "pruned_from": Path(prune).name if prune is not None else None,
              "optimizer": "Adam"}
    return {
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer_to_dict(task.tokenizer),
        "task": task.describe(),
        "train": {"step": steps, "steps": steps, "seed": seed, "train_config": config,
                  "history": history.to_dict("records"), "metrics": metrics,
                  "wall_time_s": metrics["wall_time_s"], "threads": torch.get_num_threads(),
                  "versions": versions, "command": command},
        "optimizer": None,
        "rng": None,
    }
