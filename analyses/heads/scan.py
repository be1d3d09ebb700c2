"""The streaming driver every head score shares: hooks on ``hook_pattern`` feed accumulators.

:func:`scan` runs the model over batches with forward hooks on
``blocks.{l}.attn.hook_pattern`` that hand each layer's pattern [batch, head, q, k] to every
:class:`Accumulator` and keep nothing, so memory does not grow with the corpus and only the
hooked layers run the eager kernel (the core picks SDPA elsewhere). The offsets and
directions below are the ones every score family and the labels share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from analyses import distributed
from analyses.heads.batches import TokenBatch
from interp import HookedTransformer
from interp.errors import InterpError
from interp.progress import Progress, no_progress

__all__ = ["DIRECTIONS", "MODE_MAX_OFFSET", "OFFSETS", "SEMANTIC_MAX_OFFSET", "Accumulator",
           "check_model", "scan"]

OFFSETS = (-3, -2, -1, 0, 1, 2, 3)
SEMANTIC_MAX_OFFSET = 32  # relative offsets beyond +-32 share one fixed-effect bucket per side
MODE_MAX_OFFSET = 32  # mode_offset looks at argmax offsets up to +-32 (beyond: clipped)
DIRECTIONS = ("dependent->head", "head->dependent")


class Accumulator:
    """Running sums for all layers; ``begin`` sees each batch once, ``update`` each layer's
    pattern. ``SUMS`` names the running sums (tensors and counts) that add over batches:
    :meth:`reduce` sums them over the ranks of a distributed run (:mod:`analyses.distributed`),
    which is exact because every score is a ratio of such sums."""

    SUMS: tuple[str, ...] = ()

    def reduce(self) -> None:
        """Sum this rank's running sums with every other rank's (nothing in a plain run)."""
        distributed.reduce_sums(self, self.SUMS)

    def begin(self, batch: TokenBatch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update(self, layer: int, pattern: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def check_model(model: HookedTransformer) -> None:
    """A clear error for anything that is not a model with our blocks."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise InterpError("The head taxonomy needs an interp.HookedTransformer (decoder or "
                          f"encoder); got {type(model).__name__}.")


def _layers(model: HookedTransformer, layers: Iterable[int] | None) -> list[int]:
    n = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n))
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n]
    if bad:
        raise InterpError(f"Layer {bad[0]} is out of range: the model has {n} layers "
                          f"(0-{n - 1}).")
    return out


def scan(model: HookedTransformer, batches: Iterable[TokenBatch],
         accumulators: list[Accumulator], *, layers: Iterable[int] | None = None,
         progress: Progress | None = None, desc: str = "", total: int | None = None) -> int:
    """Run ``model`` over ``batches`` with hooks on ``blocks.{l}.attn.hook_pattern`` that hand
    each pattern to every accumulator and keep nothing. Returns the number of batches.

    Only the hooked layers run the eager kernel (the core's auto kernel), and the forward
    stops before the unembedding (``return_type=None``).
    """
    check_model(model)
    layer_ids = _layers(model, layers)

    def hook_for(layer: int) -> Callable:
        def fn(pattern: torch.Tensor, hook: object) -> None:
            for acc in accumulators:
                acc.update(layer, pattern.detach())
        return fn

    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook_for(layer)) for layer in layer_ids]
    it = (progress or no_progress)(batches, desc=desc, total=total)
    count = 0
    device = model.W_E.device
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for batch in it:
            for acc in accumulators:
                acc.begin(batch)
            mask = None if bool(batch.valid.all()) else batch.valid.long().to(device)
            model(batch.tokens.to(device), attention_mask=mask, return_type=None)
            count += 1
    return count
