"""What every training task is: a seeded batch generator with a documented mechanism.

:class:`Task` holds the plain, JSON-able parameters (stored in checkpoints, so the data can be
regenerated), checks that a model config can train on it, and leaves :meth:`Task.sample` and
:meth:`Task.evaluate` to each task; :class:`Batch` is what it yields. The tasks themselves are
in :mod:`.induction`, :mod:`.knowledge`, :mod:`.domains` and :mod:`.text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from interp.config import ModelConfig
from interp.errors import InterpError

__all__ = ["Batch", "Task", "float_param", "int_param", "next_token_labels"]


@dataclass
class Batch:
    """One training batch.

    ``tokens`` [batch, pos] are the model inputs; ``labels`` [batch, pos] the target for the
    logits at each position (the next token, or -100 where no loss is taken), so the loss is
    ``cross_entropy(logits[b, t], labels[b, t])``. ``domain_ids`` [batch, pos] (``domains``
    only) is the domain of each input token, -1 for BOS.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor | None = None


def next_token_labels(tokens: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = tokens[:, t + 1]; the last position has no target (-100)."""
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return labels


def int_param(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """``value`` if it is an integer in [lo, hi]; otherwise an error naming the parameter."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < lo
            or (hi is not None and value > hi)):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InterpError(f"Task parameter {name} must be an integer {bound}, got {value!r}.")
    return value


def float_param(name: str, value: Any, lo: float, hi: float) -> float:
    """``value`` as a float if it is a number in [lo, hi]; otherwise an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InterpError(f"Task parameter {name} must be a number between {lo} and {hi}, "
                          f"got {value!r}.")
    return float(value)


class Task:
    """A seeded generator of training batches with a documented mechanism.

    Subclasses set :attr:`name`, :attr:`mechanism`, :attr:`defaults` (task parameters),
    :attr:`model_defaults` (ModelConfig fields sized for a CPU run of a few minutes) and
    :attr:`train_defaults` (TrainConfig fields), and implement :meth:`sample` and
    :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    mechanism: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    model_defaults: ClassVar[dict[str, Any]] = {}
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise InterpError(
                f"Unknown parameter(s) {', '.join(unknown)} for task {self.name!r}; "
                f"valid: {', '.join(sorted(self.defaults))}."
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()
        self.tokenizer = self._build_tokenizer()

    # --- what subclasses provide ---
    def _validate(self) -> None:
        raise NotImplementedError

    def _build_tokenizer(self) -> Any:
        raise NotImplementedError

    @property
    def d_vocab(self) -> int:
        """Smallest ``d_vocab`` a model for this task needs."""
        return len(self.tokenizer)

    @property
    def seq_len(self) -> int:
        """Length of every training sequence (a model needs ``n_ctx`` at least this)."""
        raise NotImplementedError

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A batch drawn with ``generator`` (the only source of randomness)."""
        raise NotImplementedError

    def forward(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a training batch; a task that feeds its sequences in pieces (segments
        through a memory, :mod:`.retrieval`) overrides it."""
        return model(tokens)

    @torch.no_grad()
    def evaluate(self, model: Any, seed: int = 12345) -> dict[str, float]:
        """Task metrics of a trained model (a fixed held-out draw, independent of training)."""
        raise NotImplementedError

    # --- shared ---
    def model_config(self, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """The task's default ModelConfig with ``overrides`` applied (and checked)."""
        fields = {"d_vocab": self.d_vocab, "n_ctx": self.seq_len, **self.model_defaults,
                  **(overrides or {})}
        try:
            cfg = ModelConfig.from_dict(fields)
        except ValueError as e:
            raise InterpError(str(e)) from None
        self.check_config(cfg)
        return cfg

    def check_config(self, cfg: ModelConfig) -> None:
        """Refuse, with the reason, a config this task cannot train."""
        if cfg.architecture != "decoder":
            raise InterpError(
                f"Task {self.name!r} trains next-token prediction, which needs a causal decoder; "
                f"architecture={cfg.architecture!r} is not one (set architecture='decoder')."
            )
        if not cfg.has_unembed:
            raise InterpError(f"Task {self.name!r} needs a language-model head; "
                              "set has_unembed=True.")
        allowed = cfg.mask.build(8, 8)
        if bool(torch.triu(allowed, diagonal=1).any()):
            raise InterpError(
                f"Mask {cfg.mask} lets a position see later tokens, so next-token training "
                "would copy the answer; use a causal mask (e.g. 'causal' or "
                "'causal&sliding_window:W')."
            )
        if cfg.soft_mask_penalty is not None:
            raise InterpError(
                "soft_mask_penalty lets a position see later tokens (a finite penalty, not a hard "
                "mask), so next-token training would leak the answer; remove it for training "
                "(analyses can apply it later)."
            )
        if cfg.d_vocab < self.d_vocab or cfg.d_vocab_out < self.d_vocab:
            raise InterpError(
                f"Task {self.name!r} has {self.d_vocab} tokens but the config has "
                f"d_vocab={cfg.d_vocab}"
                f"{'' if cfg.d_vocab_out == cfg.d_vocab else f', d_vocab_out={cfg.d_vocab_out}'}; "
                f"set d_vocab to at least {self.d_vocab}."
            )
        if cfg.n_ctx < self.seq_len:
            raise InterpError(
                f"Task {self.name!r} trains on sequences of {self.seq_len} tokens but "
                f"n_ctx={cfg.n_ctx}; "
                f"set n_ctx to at least {self.seq_len}."
            )

    def describe(self) -> dict[str, Any]:
        """Plain-dict description stored in checkpoints: name and parameters."""
        return {"name": self.name, "params": dict(self.params)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"
