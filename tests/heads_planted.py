"""Hand-set models with known heads, for tests/test_heads*.py.

Each model's residual stream is a direct sum of one-hot subspaces (token, position, "previous
token", output), and every head's W_Q/W_K/W_V/W_O is written into the core's storage through
the per-head views, so what each head attends to is known exactly. :func:`offset_model` is
the positional-only variant: one head per relative offset, any vocabulary.
"""

from __future__ import annotations

import math

import torch

import interp

V, N = 24, 40  # vocabulary and context
TOK, POS, PREV, OUT = 0, V, V + N, 2 * V + N  # subspace offsets in the residual stream
D_MODEL, D_HEAD = 3 * V + N, V + N
BETA = 30.0 * math.sqrt(D_HEAD)  # pre-scale logit gap: the target gets all but e^-30 of the mass


def _zero(model: interp.HookedTransformer) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def _pos_embed(model: interp.HookedTransformer) -> None:
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.embed.W_E[torch.arange(V), TOK + torch.arange(V)] = 1.0
        model.pos_embed.W_pos.zero_()
        model.pos_embed.W_pos[torch.arange(N), POS + torch.arange(N)] = 1.0


def _offset_head(attn, h: int, offset: int) -> None:
    """Query at position i attends to key i + offset (a positional head)."""
    for i in range(N):
        j = i + offset
        if 0 <= j < N:
            attn.W_Q[h][POS + i, j] = BETA
    for j in range(N):
        attn.W_K[h][POS + j, j] = 1.0


def _sink_head(attn, h: int) -> None:
    """Every query attends to position 0 (a constant query from the bias)."""
    attn.b_Q[h][0] = BETA
    attn.W_K[h][POS + 0, 0] = 1.0


def decoder() -> interp.HookedTransformer:
    """Causal, learned positions, attention only. Heads:

    L0H0 previous-token (writes the previous token into PREV), L0H1 sink (position 0), L0H2
    uniform, L0H3 duplicate-token (same token, self excluded); L1H0 induction (query: current
    token, key: PREV; copies the attended token to OUT, which W_U reads), L1H1-3 uniform.
    """
    cfg = interp.ModelConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_heads=4,
        d_head=D_HEAD,
        d_vocab=V,
        n_ctx=N,
        architecture="decoder",
        positional="learned",
        attn_only=True,
        norm="none",
        attn_out_bias=False,
    )
    model = interp.HookedTransformer(cfg)
    _zero(model)
    _pos_embed(model)
    with torch.no_grad():
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        _offset_head(a0, 0, -1)
        a0.W_V[0][TOK + torch.arange(V), torch.arange(V)] = 1.0
        a0.W_O[0][torch.arange(V), PREV + torch.arange(V)] = 1.0
        _sink_head(a0, 1)
        # L0H3 duplicate token: same token id scores BETA, the query's own position -BETA
        a0.W_Q[3][TOK + torch.arange(V), torch.arange(V)] = BETA
        a0.W_K[3][TOK + torch.arange(V), torch.arange(V)] = 1.0
        a0.W_Q[3][POS + torch.arange(N), V + torch.arange(N)] = -BETA
        a0.W_K[3][POS + torch.arange(N), V + torch.arange(N)] = 1.0
        # L1H0 induction: current token (query) matches the previous token of the key
        a1.W_Q[0][TOK + torch.arange(V), torch.arange(V)] = BETA
        a1.W_K[0][PREV + torch.arange(V), torch.arange(V)] = 1.0
        a1.W_V[0][TOK + torch.arange(V), torch.arange(V)] = 1.0
        a1.W_O[0][torch.arange(V), OUT + torch.arange(V)] = 1.0
        model.unembed.weight.zero_()
        model.unembed.weight[torch.arange(V), OUT + torch.arange(V)] = 1.0  # W_U reads OUT
    return model.eval()


def encoder() -> interp.HookedTransformer:
    """Bidirectional, learned positions, attention only. L0H0 fixed offset +2, L0H1 uniform,
    L0H2 sink (position 0), L0H3 previous-token."""
    cfg = interp.ModelConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_heads=4,
        d_head=D_HEAD,
        d_vocab=V,
        n_ctx=N,
        architecture="encoder",
        positional="learned",
        attn_only=True,
        norm="none",
        has_unembed=False,
        attn_out_bias=False,
    )
    model = interp.HookedTransformer(cfg)
    _zero(model)
    _pos_embed(model)
    with torch.no_grad():
        a0 = model.blocks[0].attn
        _offset_head(a0, 0, +2)
        _sink_head(a0, 2)
        _offset_head(a0, 3, -1)
    return model.eval()


DECODER_LABELS = {
    (0, 0): "previous-token",
    (0, 1): "sink",
    (0, 2): "uniform",
    (0, 3): "duplicate-token",
    (1, 0): "induction",
    (1, 1): "uniform",
    (1, 2): "uniform",
    (1, 3): "uniform",
}
ENCODER_LABELS = {(0, 0): "positional", (0, 1): "uniform", (0, 2): "sink", (0, 3): "previous-token"}


def offset_model(offsets: tuple[int, ...], *, architecture: str = "encoder", n_ctx: int = N,
                 d_vocab: int = V, tokenizer=None, mask: str | None = None
                 ) -> interp.HookedTransformer:
    """One attention layer, head h a pure positional head: query i attends key i + offsets[h]
    wherever that key exists and is visible (all but e^-30 of its mass), and spreads evenly
    where it does not (edge rows: no such key, padding, or outside the mask).

    Only positions are read (the residual stream is the one-hot position, token embeddings are
    zero), so any vocabulary works: ``d_vocab`` / ``tokenizer`` give the model a real one (e.g.
    MiniLM's, for text with [CLS]/[SEP])."""
    cfg = interp.ModelConfig(
        n_layers=1,
        d_model=n_ctx,
        n_heads=len(offsets),
        d_head=n_ctx,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        architecture=architecture,
        positional="learned",
        attn_only=True,
        norm="none",
        has_unembed=architecture == "decoder",
        attn_out_bias=False,
        **({} if mask is None else {"mask": mask}),
    )
    model = interp.HookedTransformer(cfg, tokenizer=tokenizer)
    _zero(model)
    beta = 30.0 * math.sqrt(n_ctx)
    with torch.no_grad():
        model.pos_embed.W_pos.copy_(torch.eye(n_ctx))
        attn = model.blocks[0].attn
        for h, o in enumerate(offsets):
            for i in range(n_ctx):
                if 0 <= i + o < n_ctx:
                    attn.W_Q[h][i, i + o] = beta
            attn.W_K[h][torch.arange(n_ctx), torch.arange(n_ctx)] = 1.0
    return model.eval()
