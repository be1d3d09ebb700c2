"""Train small models with known mechanisms, on the CPU, in minutes.

An analysis is only trustworthy once it has found what we know is there. The tasks here
(:mod:`interp.train.tasks`) have ground truth: repeated random sequences (a previous-token
head and an induction head must appear; Olsson et al. 2022), a synthetic knowledge base
(facts must be stored; Geva et al. 2021, Meng et al. 2022), multi-domain token streams
(MoE experts may specialise; Fedus et al. 2021) and plain text.

>>> from interp.train import train
>>> model, history, metrics = train("induction", {"d_model": 32}, steps=5, seed=0, quiet=True)
>>> model.cfg.attn_only, len(history) > 0
(True, True)

Python API:

- :func:`train` ``(task, model_config=None, train_config=None, *, task_params=None, out=None,
  resume=None, quiet=False, save_optimizer=True, **options) -> (model, history, metrics)``
- :class:`TrainConfig`: steps, batch_size, lr, warmup_steps, min_lr_ratio, weight_decay,
  betas, grad_clip, seed, log_every, eval_every, save_every, device.
- :data:`TASKS`, :func:`make_task`: the task classes by name.
- :func:`knowledge_facts` ``(model | checkpoint path | dict | Knowledge)`` -> list of
  :class:`Fact` (prompt tokens, subject span, answer) of the knowledge base it was trained on.
- :func:`domain_batches` ``(model | path | dict | Domains, batch_size, n_batches, seed)``
  yields ``(tokens, domain_ids)`` with the domain of every token.
- :func:`task_from` rebuilds the task a model or checkpoint was trained on.
- :func:`load_checkpoint` ``(path) -> model`` reads a training checkpoint (the same files
  :func:`interp.load_pretrained` loads).
- :func:`shipped` ``(name) -> Path`` of a checkpoint packaged in ``interp/data``.
- :func:`read_checkpoint`, :func:`model_from_checkpoint` (from :mod:`interp.checkpoint`, the
  one checkpoint module): a checkpoint's dict, and a trainable model built from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from interp.checkpoint import load_checkpoint as _load_checkpoint
from interp.checkpoint import model_from_checkpoint, read_checkpoint
from interp.errors import InterpError
from interp.train.tasks import (
    TASKS,
    Batch,
    Domains,
    Fact,
    Induction,
    Knowledge,
    Task,
    Text,
    make_task,
)
from interp.train.trainer import TrainConfig, TrainResult, train

__all__ = [
    "SHIPPED",
    "TASKS",
    "Batch",
    "Domains",
    "Fact",
    "Induction",
    "Knowledge",
    "Task",
    "Text",
    "TrainConfig",
    "TrainResult",
    "domain_batches",
    "knowledge_facts",
    "load_checkpoint",
    "make_task",
    "model_from_checkpoint",
    "read_checkpoint",
    "shipped",
    "task_from",
    "train",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# checkpoints packaged in interp/data (scripts/train_shipped.sh regenerates them)
SHIPPED = ("induction", "knowledge", "domains_moe", "induction_sinusoidal", "induction_learned",
           "induction_rope", "induction_alibi", "offsets_span", "induction_gates")
SHIPPED += ("retrieval_knn",)  # memory-augmented attention (interp.memory)
SHIPPED += ("retrieval_xl",)  # Transformer-XL / compressive memory on every layer


def shipped(name: str) -> Path:
    """Path of a packaged checkpoint, e.g. ``shipped("induction")`` ->
    ``.../interp/data/induction.pt``."""
    stem = name[:-3] if name.endswith(".pt") else name
    if stem not in SHIPPED:
        raise InterpError(f"Unknown packaged checkpoint {name!r}; valid: {', '.join(SHIPPED)}.")
    path = DATA_DIR / f"{stem}.pt"
    if not path.is_file():
        raise InterpError(f"Packaged checkpoint {path} is missing; regenerate it with "
                          "scripts/train_shipped.sh.")
    return path


def load_checkpoint(path: str | Path, device: str = "cpu") -> Any:
    """A trained model (weights, config, tokenizer) from a ``.pt`` written by :func:`train`,
    in eval mode; the same as ``interp.load_pretrained(path)`` (training metadata lands in
    ``model.checkpoint_metadata``)."""
    return _load_checkpoint(path, device=device).eval()


def task_from(source: Any) -> Task:
    """The task a model or checkpoint was trained on, rebuilt from its stored parameters.

    ``source``: a model (reads ``model.cfg.extra["task"]``), a checkpoint path or dict, a
    ModelConfig, or a :class:`Task` (returned as is).
    """
    if isinstance(source, Task):
        return source
    if isinstance(source, str | Path):
        source = read_checkpoint(source)
    if isinstance(source, dict):
        desc = source.get("task") or (source.get("config") or {}).get("extra", {}).get("task")
    else:
        cfg = getattr(source, "cfg", source)
        desc = getattr(cfg, "extra", {}).get("task") if hasattr(cfg, "extra") else None
    if not isinstance(desc, dict) or "name" not in desc:
        raise InterpError("This model carries no training-task record (cfg.extra['task']); "
                          "train it with interp.train.")
    return make_task(desc["name"], **desc.get("params", {}))


def knowledge_facts(source: Any) -> list[Fact]:
    """Every fact a ``knowledge`` model was trained on: prompt tokens, subject span, answer.

    ``source``: the trained model, its checkpoint path or dict, or a :class:`Knowledge` task.
    The facts are regenerated from the stored task parameters (the knowledge base is a
    function of ``data_seed``), in a fixed order.

    >>> from interp.train import Knowledge, knowledge_facts
    >>> f = knowledge_facts(Knowledge(n_subjects=3, n_relations=2))[0]
    >>> f.prompt_tokens[f.subject_span[0]:f.subject_span[1]] == f.prompt_tokens[1:-1]
    True
    """
    task = task_from(source)
    if not isinstance(task, Knowledge):
        raise InterpError("knowledge_facts needs a model trained on 'knowledge', "
                          f"not {task.name!r}.")
    return task.facts()


def domain_batches(source: Any, batch_size: int = 32, n_batches: int = 8, seed: int = 0
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens [batch, pos], domain_ids [batch, pos])`` from a ``domains`` model's task.

    ``domain_ids`` is each token's domain (0..n_domains-1; -1 for BOS); the domain token
    sub-vocabularies are ``task.domain_token_ids(d)``. Seeded, so two calls with the same seed
    give the same batches.
    """
    task = task_from(source)
    if not isinstance(task, Domains):
        raise InterpError(f"domain_batches needs a model trained on 'domains', not {task.name!r}.")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        b = task.sample(batch_size, gen)
        yield b.tokens, b.domain_ids
