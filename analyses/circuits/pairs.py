"""Clean/corrupted prompt pairs: the input every patching method in this package shares.

A pair is two token sequences of the same length that differ where the behaviour under study
reads its evidence (Heimersheim and Nanda (2024), *How to use and interpret activation
patching*, arXiv:2404.15255, sec. 2): the clean prompt makes the model predict ``answer`` at
the last position, the corrupted one should not. ``wrong`` is the competing token of the logit
difference. Pairs of different lengths may sit in one set (IOI prompts tokenise to different
lengths); :meth:`PromptPairs.batches` groups them by length, so every forward is rectangular
and no padding token ever enters a patched run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from interp.errors import InterpError

__all__ = ["PairBatch", "PromptPairs", "induction_pairs"]


@dataclass(frozen=True)
class PairBatch:
    """Pairs of one length, stacked: ``clean``/``corrupted`` [batch, pos], ``answer``/``wrong``
    [batch] token ids predicted at the last position."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.clean, self.corrupted, self.answer,
                                                     self.wrong)))


@dataclass(frozen=True)
class PromptPairs:
    """A set of clean/corrupted pairs (see the module docstring). Build it with
    :meth:`from_lists`; a pair whose two prompts differ in length is refused, because patching
    copies activations position by position."""

    clean: tuple[torch.Tensor, ...]  # each [pos] int64
    corrupted: tuple[torch.Tensor, ...]  # each [pos] int64, same length as its clean prompt
    answer: torch.Tensor  # [n_pairs]
    wrong: torch.Tensor  # [n_pairs]

    def __post_init__(self) -> None:
        n = len(self.clean)
        if n == 0:
            raise InterpError("The prompt-pair set is empty; give at least one clean/corrupted "
                              "pair.")
        if len(self.corrupted) != n or len(self.answer) != n or len(self.wrong) != n:
            raise InterpError(f"{n} clean prompts but {len(self.corrupted)} corrupted prompts, "
                              f"{len(self.answer)} answers and {len(self.wrong)} wrong tokens; "
                              "give one of each per pair.")
        for i, (c, k) in enumerate(zip(self.clean, self.corrupted, strict=True)):
            if c.shape != k.shape or c.ndim != 1:
                raise InterpError(
                    f"Pair {i}: the clean prompt has {c.shape[-1]} tokens and the corrupted "
                    f"{k.shape[-1]}; patching copies activations position by position, so make "
                    "both tokenise to the same length (pick names/words of equal token count) "
                    "or drop the pair.")

    @classmethod
    def from_lists(cls, clean: Sequence[Sequence[int]], corrupted: Sequence[Sequence[int]],
                   answer: Sequence[int], wrong: Sequence[int]) -> PromptPairs:
        """Pairs from plain token-id lists (one list per prompt)."""
        as_t = [torch.as_tensor(list(x), dtype=torch.long) for x in clean]
        as_k = [torch.as_tensor(list(x), dtype=torch.long) for x in corrupted]
        return cls(tuple(as_t), tuple(as_k), torch.as_tensor(list(answer), dtype=torch.long),
                   torch.as_tensor(list(wrong), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.clean)

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        """Batches of at most ``batch_size`` pairs of one length, in a fixed order (by length,
        then index), so streaming never holds more than one batch's activations."""
        if batch_size < 1:
            raise InterpError(f"batch_size must be at least 1, got {batch_size}.")
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(self.clean):
            by_len.setdefault(int(c.shape[0]), []).append(i)
        for length in sorted(by_len):
            idx = by_len[length]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                yield PairBatch(torch.stack([self.clean[i] for i in chunk]),
                                torch.stack([self.corrupted[i] for i in chunk]),
                                self.answer[chunk], self.wrong[chunk])


def induction_pairs(n_pairs: int = 64, *, half_len: int = 16, n_tokens: int = 64,
                    bos: int = 0, cue: int | None = None, seed: int = 0) -> PromptPairs:
    """Induction pairs for the shipped induction models (vocabulary ``<bos>`` = 0, ``t0..t63`` =
    1..64).

    Clean: ``[BOS] x1..xn x1..xm`` (``m`` drawn in ``2..n-1``): an induction head at the last
    position finds the earlier ``xm`` and copies the token after it, ``x(m+1)`` (the answer).
    Corrupted: the same, but the *first* copy of ``xm`` is replaced by a fresh token, so the
    earlier match is gone; only the previous-token information at position ``m+1`` and the
    induction head's lookup differ, which is what patching should find (Olsson et al. (2022),
    *In-context Learning and Induction Heads*). ``xm`` and ``x(m+1)`` are made unique in the
    first half. ``wrong`` is a token absent from both prompts. ``cue`` fixes ``m`` (then every
    pair has the same positions, for patching by position).
    """
    if cue is not None and not 2 <= cue < half_len:
        raise InterpError(f"cue must be in 2..{half_len - 1} (a token of the first half with a "
                          f"successor), got {cue}.")
    if half_len < 3:
        raise InterpError(f"half_len must be at least 3 for an induction pair, got {half_len}.")
    gen = torch.Generator().manual_seed(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for _ in range(n_pairs):
        x = torch.randperm(n_tokens, generator=gen)[:half_len] + 1  # distinct: one match each
        m = cue if cue is not None else int(torch.randint(2, half_len, (1,), generator=gen))
        unused = [t for t in range(1, n_tokens + 1) if t not in set(x.tolist())]
        pick = torch.randperm(len(unused), generator=gen)[:2].tolist()
        fresh, other = unused[pick[0]], unused[pick[1]]
        c = torch.cat([torch.tensor([bos]), x, x[:m]])
        k = c.clone()
        k[m] = fresh  # position m holds x_m in the first half ([BOS] is position 0)
        clean.append(c)
        corrupted.append(k)
        answer.append(int(x[m]))
        wrong.append(other)
    return PromptPairs(tuple(clean), tuple(corrupted), torch.tensor(answer), torch.tensor(wrong))
