"""Planted ground truth: a model whose routing is known, and a domain stream that matches it.

Used by the tests, the docs and the memory benchmark: the analysis must find exactly the
specialisation planted here (token t goes to expert ``t mod E``; domain d holds the tokens of
class d, so NMI(expert; domain) is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from interp import HookedTransformer, ModelConfig
from interp.errors import InterpError

__all__ = ["class_batches", "planted_router_model"]


def planted_router_model(n_experts: int = 4, d_vocab: int = 32, *, top_k: int = 2,
                         n_layers: int = 2, d_model: int = 32, seed: int = 0,
                         scale: float = 8.0) -> tuple[HookedTransformer, Callable[[int], int]]:
    """A model whose router sends token t to expert ``t mod n_experts`` in every MoE layer.

    Hand-set weights: the embedding writes a one-hot of the token's class ``t mod E`` (times
    ``scale``) into the first E residual dimensions and small noise elsewhere; attention and
    experts write nothing back (output weights zero), so the residual keeps the class; each
    router reads those E dimensions. Returns (model, class_of_token).
    """
    E = n_experts
    if d_model < E + 2:
        raise InterpError(f"d_model={d_model} must exceed n_experts + 1 for the planted router.")
    cfg = ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_vocab=d_vocab, n_ctx=512,
                      positional="none", norm="rmsnorm", act="silu", n_experts=E,
                      experts_per_token=top_k, d_mlp=16, attn_qkv_bias=False,
                      attn_out_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W_E = 0.05 * torch.randn(d_vocab, d_model, generator=g)
        W_E[:, :E] = 0
        W_E[torch.arange(d_vocab), torch.arange(d_vocab) % E] = scale
        model.embed.W_E.copy_(W_E)
        for block in model.blocks:
            block.attn.o.weight.zero_()
            for expert in block.mlp.experts:
                expert.fc_out.weight.zero_()
            R = torch.zeros(E, d_model)
            R[:, :E] = torch.eye(E)
            block.mlp.router.weight.copy_(R + 0.01 * torch.randn(E, d_model, generator=g))
    model.eval()
    return model, (lambda t: t % E)


def class_batches(d_vocab: int, n_classes: int, *, n_batches: int, batch_size: int = 8,
                  seq_len: int = 64, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences of one class each (tokens ``t`` with ``t mod n_classes == domain``): a domain
    stream whose ground truth is the planted router's class. Yields (tokens, domain_ids)."""
    g = torch.Generator().manual_seed(seed)
    per = torch.arange(d_vocab)
    for _ in range(n_batches):
        dom = torch.randint(0, n_classes, (batch_size,), generator=g)
        rows = []
        for d in dom.tolist():
            pool = per[per % n_classes == d]
            rows.append(pool[torch.randint(0, len(pool), (seq_len,), generator=g)])
        yield torch.stack(rows), dom
