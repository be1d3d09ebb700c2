"""``model.memory``: the run-time memory of a memory-augmented model, and its segment runner.

The memories themselves (persistent slots, a kNN store, Transformer-XL states) live in
:mod:`interp.components.memory`; what an earlier forward left for later ones is run-time state,
gathered here per layer so a user can reset it, save it, load it, freeze it, and feed a long
sequence to the model one segment at a time::

    model.memory.reset()                          # forget every earlier forward
    logits = model.memory.run(tokens, segment_len=16)   # segments in order; memory carries over
    model.memory.save("mem.safetensors"); model.memory.load("mem.safetensors")
    with model.memory.frozen(): model(tokens)     # read the memory, add nothing to it

Persistent slots are parameters, not state: they are in the weights, and :meth:`reset` leaves
them alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from interp.components.memory import MemoryStore
from interp.errors import InterpError

__all__ = ["ModelMemory"]


class ModelMemory:
    """Every memory layer's store of one model (``model.memory``), by layer index."""

    def __init__(self, model: torch.nn.Module, stores: dict[int, MemoryStore]):
        self._model = weakref.ref(model)  # the model owns this object: no reference cycle
        self.kind: str = model.cfg.memory_kind
        self.stores = stores

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.stores)

    def reset(self) -> None:
        """Forget what earlier forwards stored (persistent slots are weights and stay)."""
        for s in self.stores.values():
            s.reset()

    def __len__(self) -> int:
        """Entries held by the first memory layer (keys for kNN, states for XL)."""
        s = next(iter(self.stores.values()))
        return sum(t.shape[1] for n, t in s.tensors().items() if n != "v")

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Forwards inside read the memory and add nothing to it (analyses, ablations)."""
        before = {i: s.writing for i, s in self.stores.items()}
        for s in self.stores.values():
            s.writing = False
        try:
            yield
        finally:
            for i, s in self.stores.items():
                s.writing = before[i]

    def set_detach(self, detach: bool) -> None:
        """``False`` keeps kNN stores in the autograd graph (training over the segments of one
        document, resetting each batch); ``True`` (the default) is Wu et al.'s
        non-differentiable memory."""
        for s in self.stores.values():
            s.detach = bool(detach)

    def run(self, tokens: torch.Tensor, segment_len: int, **forward_kwargs: Any
            ) -> torch.Tensor:
        """Logits [batch, pos, d_vocab] of ``tokens`` [batch, pos] fed ``segment_len`` tokens at
        a time, in order: each segment sees its own tokens as context and earlier segments
        only through the memory (which keeps what this call added)."""
        model = self._model()
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            raise InterpError("model.memory.run needs token ids [batch, pos].")
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
            raise InterpError(f"segment_len must be a positive integer, got {segment_len!r}.")
        outs = [model(tokens[:, s : s + segment_len], **forward_kwargs)
                for s in range(0, tokens.shape[1], segment_len)]
        return torch.cat(outs, 1)

    def state(self) -> dict[str, torch.Tensor]:
        """The stores as ``{"blocks.{l}.{part}": tensor}`` (what :meth:`save` writes)."""
        return {f"blocks.{i}.{n}": t.detach().contiguous().cpu()
                for i, s in self.stores.items() for n, t in s.tensors().items()}

    def save(self, path: str | Path) -> Path:
        """Write the stores to a safetensors file (tensors only: nothing runs on loading)."""
        from safetensors.torch import save_file

        path = Path(path)
        save_file(self.state(), str(path), metadata={"memory_kind": self.kind})
        return path

    def load(self, path: str | Path) -> None:
        """Replace the stores by those saved in ``path`` (a file from :meth:`save` for a model
        with the same memory kind and layers)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InterpError(f"No memory file at {path}; write one with model.memory.save().")
        try:
            with safe_open(str(path), framework="pt") as f:
                kind = (f.metadata() or {}).get("memory_kind")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # a truncated or foreign file: say which, in one line
            raise InterpError(f"{path} is not a memory file ({type(e).__name__}); "
                              "write one with model.memory.save().") from None
        if kind != self.kind:
            raise InterpError(f"{path} holds memory_kind={kind!r}, this model has "
                              f"{self.kind!r}.")
        self._check_names(path, tensors)
        self.reset()
        device = next(self._model().parameters()).device
        for name, t in tensors.items():
            _, layer, part = name.split(".")
            setattr(self.stores[int(layer)], part, t.to(device))

    def _check_names(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        parts = ("k", "v", "states", "compressed")
        for name in tensors:
            bits = name.split(".")
            ok = (len(bits) == 3 and bits[0] == "blocks" and bits[1].isdigit()
                  and int(bits[1]) in self.stores and bits[2] in parts)
            if not ok:
                raise InterpError(f"{path}: unexpected tensor {name!r}; this model's memory "
                                  f"layers are {list(self.stores)}.")
