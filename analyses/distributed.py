"""Data-parallel analyses on ``torch.distributed``: shard the work, reduce the sums exactly.

An analysis that streams running sums over batches (the head taxonomy, the MoE routing
statistics) runs unchanged on N processes: every rank builds the same deterministic stream of
batches (same corpus, same seed, same padding and sort order), keeps every ``size``-th batch
from its ``rank`` (:func:`shard`), adds its batches into its accumulators, and the
accumulators are then summed across ranks with ``all_reduce`` (:func:`reduce_sums`). Sums and
counts merge exactly, so the ratios computed from them afterwards are the one-process ratios
(not averages of per-rank averages); only the order of float64 additions differs. Where the
corpus is too small to split (masking's default is one batch), the units of work are shared
instead with :func:`mine` (index ``i`` of a list every rank holds: a (batch, strategy) pair, a
(batch, head) pair, a pruning-curve point) and the results added or gathered in order.

The process group comes from the environment that ``torchrun`` (or SLURM, or
``interp --nproc N``) sets: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
(:func:`session`). Gloo on CPU, NCCL when the run uses CUDA. Without such an environment
every function here is the one-process identity, so library callers never need a process
group. A collective that fails because another rank died raises :class:`RankFailure`, a
one-line :class:`~interp.errors.InterpError`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from interp.errors import InterpError

__all__ = ["RankFailure", "World", "all_max", "env_world_size", "gather_in_order", "gather_objects",
           "mine", "reduce_sums", "session", "shard", "sum_values", "world"]

T = TypeVar("T")


class RankFailure(InterpError):
    """Another rank of a distributed run failed or was killed, so this one cannot finish."""


@dataclass(frozen=True)
class World:
    """This process' place in the run: ``rank`` of ``size`` (0 of 1 without a process group)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the results (rank 0; the only one in a plain run)."""
        return self.rank == 0


def world() -> World:
    """The current process group's rank and size, or ``World(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun or SLURM set it (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise InterpError(f"WORLD_SIZE must be an integer, got {raw!r}.") from None


@contextlib.contextmanager
def session(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[World]:
    """Join the process group the environment describes for the duration of the block.

    ``WORLD_SIZE`` <= 1 (or unset): nothing happens, ``World(0, 1)``. Otherwise ``RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` must be set (torchrun and ``interp --nproc`` set
    them); the backend is NCCL when ``device`` is CUDA (``auto`` with a GPU), gloo otherwise.
    Each rank then uses GPU ``LOCAL_RANK``. An already initialised group is used as is.
    """
    size = env_world_size()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise InterpError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set; launch with "
                          "torchrun or interp --nproc N.")
    cuda = torch.cuda.is_available() and device != "cpu" and not device.startswith("mps")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of a stream every rank builds identically: items rank, rank + size,
    ... (round-robin, so sorted-by-length batches spread evenly over the ranks)."""
    w = world()
    if w.size == 1:
        return iter(items)
    return itertools.islice(items, w.rank, None, w.size)


def _all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """``all_reduce`` on the backend's device, with a dead peer turned into one line."""
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    buf = t.detach().to(dev).contiguous()
    try:
        dist.all_reduce(buf, op=op)
    except RuntimeError as e:  # DistBackendError and gloo's connection errors
        raise RankFailure(f"rank {dist.get_rank()}: another rank of this distributed run "
                          f"failed or was killed ({str(e).splitlines()[0][:120]}).") from None
    return buf.to(t.device)


def _test_kill() -> None:
    """Test hook: ``INTERP_TEST_KILL_RANK=<r>`` makes rank r die by SIGKILL when it reaches
    its first reduction (mid-run, after its share of the work), so tests can check that a
    lost rank fails the whole run cleanly (``tests/test_distributed.py``)."""
    target = os.environ.get("INTERP_TEST_KILL_RANK")
    if target is not None and target.strip() == str(world().rank):
        os.kill(os.getpid(), signal.SIGKILL)


def sum_values(values: Sequence[float]) -> list[float]:
    """Sum plain numbers (counts) over the ranks; exact for integers below 2**53."""
    if world().size == 1:
        return list(values)
    out = _all_reduce(torch.tensor(list(values), dtype=torch.float64), dist.ReduceOp.SUM)
    return out.tolist()


def all_max(value: int) -> int:
    """The largest ``value`` over the ranks (e.g. the capacity a growing table must reach)."""
    if world().size == 1:
        return value
    t = _all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: for what does not add
    up as a tensor sum (sparse tables, reservoir samples), merged afterwards by the caller."""
    w = world()
    if w.size == 1:
        return [obj]
    _test_kill()
    out: list[Any] = [None] * w.size
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as e:
        raise RankFailure(f"rank {w.rank}: another rank of this distributed run failed or was "
                          f"killed ({str(e).splitlines()[0][:120]}).") from None
    return out


def mine(index: int) -> bool:
    """Whether item ``index`` of a list every rank holds (facts, prompts) is this rank's to
    compute (round-robin); always true in a plain run."""
    w = world()
    return index % w.size == w.rank


def gather_in_order(local: dict[int, T], n: int) -> list[T]:
    """The items ``0..n-1`` that the ranks computed (each rank's ``{index: item}`` for the
    indices :func:`mine` gave it), in index order on every rank: the one-process list."""
    if world().size == 1:
        return [local[i] for i in range(n)]
    merged: dict[int, T] = {}
    for part in gather_objects(local):
        merged.update(part)
    return [merged[i] for i in range(n)]


def reduce_sums(obj: object, names: Iterable[str]) -> None:
    """Replace each named attribute of ``obj`` (a running-sum tensor or a number) by its sum
    over the ranks, in place. Tensors of one dtype travel as one flat buffer."""
    if world().size == 1:
        return
    _test_kill()
    names = list(names)
    tensors = [n for n in names if isinstance(getattr(obj, n), torch.Tensor)]
    numbers = [n for n in names if n not in tensors]
    for dtype in sorted({getattr(obj, n).dtype for n in tensors}, key=str):
        group = [n for n in tensors if getattr(obj, n).dtype == dtype]
        flat = torch.cat([getattr(obj, n).reshape(-1) for n in group])
        flat = _all_reduce(flat, dist.ReduceOp.SUM)
        start = 0
        for n in group:
            t = getattr(obj, n)
            t.copy_(flat[start: start + t.numel()].view_as(t))
            start += t.numel()
    if numbers:
        totals = sum_values([float(getattr(obj, n)) for n in numbers])
        for n, v in zip(numbers, totals, strict=True):
            setattr(obj, n, type(getattr(obj, n))(v))
