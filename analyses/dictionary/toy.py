"""The toy model of superposition (Elhage et al. 2022), as ground truth for SAEs.

``n_features`` sparse features ``x`` (each is 0 with probability ``sparsity``, else uniform on
[0, 1]) are squeezed into ``d_hidden < n_features`` dimensions, ``h = W x``, and read back as
``ReLU(W^T h + b)``. Trained on the reconstruction error, ``W`` stores more features than it
has dimensions as nearly orthogonal columns (superposition). The columns of ``W`` are then the
true feature directions of ``h``: an SAE trained on ``h`` should find them, which is what
:func:`analyses.dictionary.metrics.feature_recovery` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.errors import InterpError

__all__ = ["ToyModel", "sample_features", "train_toy_model"]


@dataclass(frozen=True)
class ToyModel:
    """A trained toy model: ``W`` [d_hidden, n_features], ``b`` [n_features], its sparsity."""

    W: torch.Tensor
    b: torch.Tensor
    sparsity: float

    @property
    def directions(self) -> torch.Tensor:
        """Unit feature directions in the hidden space, [n_features, d_hidden]."""
        return (self.W / self.W.norm(dim=0, keepdim=True).clamp_min(1e-8)).T

    @property
    def represented(self) -> torch.Tensor:
        """Features the model kept (column norm > 0.5; Elhage et al.'s plots use ||W_i|| ~ 1
        for a stored feature, ~ 0 for a dropped one), [n_features] bool."""
        return self.W.norm(dim=0) > 0.5

    def hidden(self, n: int, *, seed: int = 0) -> torch.Tensor:
        """``n`` hidden activations ``h = W x`` for fresh sparse features, [n, d_hidden]."""
        x = sample_features(n, self.W.shape[1], self.sparsity, seed=seed)
        return x @ self.W.T


def sample_features(n: int, n_features: int, sparsity: float, *, seed: int = 0) -> torch.Tensor:
    """[n, n_features]: each entry 0 with probability ``sparsity``, else uniform on [0, 1]."""
    if not 0 <= sparsity < 1:
        raise InterpError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    gen = torch.Generator().manual_seed(seed)
    on = torch.rand(n, n_features, generator=gen) >= sparsity
    return torch.rand(n, n_features, generator=gen) * on


def train_toy_model(n_features: int = 12, d_hidden: int = 4, *, sparsity: float = 0.95,
                    steps: int = 3000, batch_size: int = 1024, lr: float = 3e-3,
                    seed: int = 0) -> ToyModel:
    """Train the toy model (uniform feature importance), seconds on one CPU core."""
    if not 0 < d_hidden < n_features:
        raise InterpError(f"Superposition needs 0 < d_hidden < n_features, got d_hidden="
                          f"{d_hidden}, n_features={n_features}.")
    gen = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(d_hidden, n_features, generator=gen) * 0.3)
    b = torch.nn.Parameter(torch.zeros(n_features))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=0.0)
    for step in range(steps):
        x = sample_features(batch_size, n_features, sparsity, seed=seed * 100_003 + step + 1)
        out = torch.relu(x @ W.T @ W + b)
        loss = (out - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ToyModel(W.detach().clone(), b.detach().clone(), sparsity)
