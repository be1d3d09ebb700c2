"""The studies' corpus: a seeded first-order Markov language with a known entropy rate.

Why synthetic: the studies compare training recipes, so the data must be identical across
runs, cheap to draw on two CPU cores, and have floors we can state exactly. Each of ``vocab``
tokens has ``branching`` successors with Dirichlet-drawn probabilities, so the best possible
next-token loss is the chain's entropy rate, a model that ignores context can reach at best the
unigram entropy (a run ending above it has learned nothing from context: it failed), and a
blanked token is pinned down much better by both neighbours than by the left one alone (the
cloze advantage of bidirectional masks is measurable).
"""

from __future__ import annotations

import math

import torch

from interp.errors import InterpError

__all__ = ["MarkovCorpus"]


class MarkovCorpus:
    """Token streams from a sparse random Markov chain; token ``vocab`` is ``[MASK]``.

    ``d_vocab`` (= ``vocab + 1``) is the model vocabulary. :meth:`sample` draws windows with a
    ``torch.Generator``, so a seed fixes the data order; the chain itself comes from
    ``data_seed`` and is the same for every run of a study.
    """

    def __init__(self, vocab: int = 32, branching: int = 3, data_seed: int = 0):
        if not isinstance(vocab, int) or not 4 <= vocab <= 4096:
            raise InterpError(f"vocab must be an integer in [4, 4096], got {vocab!r}.")
        if not isinstance(branching, int) or not 1 <= branching < vocab:
            raise InterpError(f"branching must be an integer in [1, vocab), got {branching!r}.")
        self.vocab, self.branching = vocab, branching
        g = torch.Generator().manual_seed(data_seed)
        trans = torch.zeros(vocab, vocab, dtype=torch.float64)
        for i in range(vocab):
            succ = torch.randperm(vocab, generator=g)[:branching]
            # a Dirichlet(1) draw from normalised Exp(1) variables, made from the generator
            u = -torch.log(torch.rand(branching, generator=g, dtype=torch.float64))
            trans[i, succ] = u / u.sum()
        self.trans = trans  # [vocab, vocab], rows sum to 1
        self.stationary = self._stationary()

    @property
    def d_vocab(self) -> int:
        """Model vocabulary: the chain's tokens and ``[MASK]``."""
        return self.vocab + 1

    @property
    def mask_id(self) -> int:
        """Token id of ``[MASK]`` (BERT's masked-LM input)."""
        return self.vocab

    def _stationary(self) -> torch.Tensor:
        p = torch.full((self.vocab,), 1.0 / self.vocab, dtype=torch.float64)
        mixed = 0.5 * (self.trans + torch.eye(self.vocab, dtype=torch.float64))  # aperiodic
        for _ in range(2000):
            p = p @ mixed
        return p / p.sum()

    def entropy_rate(self) -> float:
        """Best achievable next-token loss (nats): sum_i pi_i H(P[i, :])."""
        t = self.trans
        h = -(t * torch.log(t.clamp_min(1e-300))).sum(-1)
        return float((self.stationary * h).sum())

    def unigram_entropy(self) -> float:
        """Loss (nats) of the best context-free predictor: the stationary distribution's."""
        p = self.stationary
        return float(-(p * torch.log(p.clamp_min(1e-300))).sum())

    def sample(self, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """``[batch, seq_len]`` windows of the chain, each started from the stationary law."""
        if batch < 1 or seq_len < 2:
            raise InterpError(f"sample needs batch >= 1 and seq_len >= 2, got {batch}, {seq_len}.")
        out = torch.empty(batch, seq_len, dtype=torch.long)
        out[:, 0] = torch.multinomial(self.stationary.float().expand(batch, -1), 1,
                                      generator=generator)[:, 0]
        probs = self.trans.float()
        for t in range(1, seq_len):
            out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=generator)[:, 0]
        return out

    def chance_nats(self) -> float:
        """Loss of a uniform guess over the chain's tokens (a freshly initialised model)."""
        return math.log(self.vocab)

    def bayes_next_accuracy(self) -> float:
        """Accuracy of the ideal next-token guess from the previous token (the chain's best)."""
        return float((self.stationary * self.trans.max(-1).values).sum())

    def bayes_cloze_accuracy(self) -> float:
        """Accuracy of the ideal guess of a blanked token from both neighbours:
        sum_{a,c} max_b pi_a P[a,b] P[b,c]."""
        joint = self.stationary[:, None, None] * self.trans[:, :, None] * self.trans[None, :, :]
        return float(joint.max(dim=1).values.sum())
