"""How much memory a config's model needs, and the refusal when this machine cannot hold it.

A config is a few integers; the model it describes may need terabytes. :func:`parameter_count`
counts the parameters a :class:`~interp.config.ModelConfig` builds, exactly (tied weights once),
from the config alone, so a loader or a caller can size a model before building it.
:func:`check_fits` refuses a model larger than the machine's memory with one line, and
:func:`allocation_errors` turns the allocator's own failure (when the memory is unknown, or the
estimate fit but the allocation did not) into that same line instead of a C++ traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from interp.errors import InterpError

if TYPE_CHECKING:
    from interp.config import ModelConfig

#: words in the allocator's errors (CPU "can't allocate memory", CUDA "out of memory", sizes past
#: int64 "Overflow when unpacking long", "Storage size calculation overflowed")
_ALLOCATION_WORDS = ("alloc", "out of memory", "overflow")


def _norm(cfg: ModelConfig, d: int) -> int:
    """One norm's parameters: LayerNorm's weight (and bias), RMSNorm's weight, or none."""
    if cfg.norm == "layernorm":
        return d * (2 if cfg.norm_bias else 1)
    return d if cfg.norm == "rmsnorm" else 0


def _mlp(cfg: ModelConfig, d_mlp: int) -> int:
    """A dense FFN of hidden width ``d_mlp``: fused [gate; up] in, then out, with biases."""
    width = d_mlp * (2 if cfg.is_gated else 1)
    bias = (width + cfg.d_model) if cfg.mlp_bias else 0
    return cfg.d_model * width + d_mlp * cfg.d_model + bias


def _attention(cfg: ModelConfig) -> int:
    """Self- or cross-attention: q, k, v (GQA: fewer k/v heads), out, optional q/k norms."""
    d, nh, nkv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    qkv = (nh + 2 * nkv) * dh
    total = d * qkv + nh * dh * d
    total += qkv if cfg.attn_qkv_bias else 0
    total += d if cfg.attn_out_bias else 0
    if cfg.qk_norm == "full":
        total += (nh + nkv) * dh
    elif cfg.qk_norm == "head":
        total += 2 * dh
    return total


def _ffn(cfg: ModelConfig, moe: bool) -> int:
    """The block's FFN: dense, or a router, routed experts and shared experts (MoE)."""
    if not moe:
        return _mlp(cfg, cfg.d_mlp)
    total = cfg.d_model * cfg.n_experts + cfg.n_experts * _mlp(cfg, cfg.d_expert)
    if cfg.n_shared_experts:
        total += _mlp(cfg, cfg.d_shared_expert * cfg.n_shared_experts)
        total += cfg.d_model if cfg.shared_expert_gate else 0
    return total


def _block(cfg: ModelConfig, *, cross: bool, moe: bool) -> int:
    """One residual block: norm + attention, norm + cross-attention, norm + FFN."""
    total = _norm(cfg, cfg.d_model) + _attention(cfg)
    total += cfg.n_heads * (int(cfg.adaptive_span) + int(cfg.l0_head_gates))  # learned masks
    if cross:
        total += _norm(cfg, cfg.d_model) + _attention(cfg)
    if not cfg.attn_only:
        total += _norm(cfg, cfg.d_model) + _ffn(cfg, moe)
    if cfg.norm_placement == "sandwich":  # a second norm per sub-layer, inside the branch
        total += _norm(cfg, cfg.d_model) * (1 if cfg.attn_only else 2)
    return total


def _embeddings(cfg: ModelConfig) -> int:
    """Token, learned position and token-type embeddings, and the embedding norm."""
    total = cfg.d_vocab * cfg.d_model + cfg.n_token_types * cfg.d_model
    total += cfg.n_ctx * cfg.d_model if cfg.positional == "learned" else 0
    return total + (_norm(cfg, cfg.d_model) if cfg.embed_norm else 0)


def _head(cfg: ModelConfig) -> int:
    """BERT's MLM transform (dense with bias, LayerNorm with bias) and the unembedding."""
    if not cfg.has_unembed:
        return 0
    total = 0 if cfg.tie_embeddings else cfg.d_vocab_out * cfg.d_model
    total += cfg.d_vocab_out if cfg.unembed_bias else 0
    if cfg.mlm_head and cfg.architecture != "encoder_decoder":
        total += cfg.d_model * cfg.d_model + cfg.d_model + 2 * cfg.d_model
    return total


def _memory(cfg: ModelConfig) -> int:
    """Memory-augmented attention's parameters on its layers: persistent key/value slots, or
    the kNN gate (one logit per head, none with ``memory_joint``; one scale per head with
    ``memory_qk_norm``); XL
    memory has none (its states are not parameters)."""
    if cfg.memory_kind is None:
        return 0
    n = cfg.n_layers if cfg.memory_layers is None else len(cfg.memory_layers)
    if cfg.memory_kind == "persistent":
        return n * 2 * cfg.n_memory_slots * cfg.n_kv_heads * cfg.d_head
    if cfg.memory_kind == "knn":
        return n * cfg.n_heads * (int(not cfg.memory_joint) + int(cfg.memory_qk_norm))
    return 0


def parameter_count(cfg: ModelConfig) -> int:
    """The number of distinct parameters the model of ``cfg`` has (tied weights once).

    Pure arithmetic on Python ints, so it never overflows; equal to
    ``build_model(cfg).param_count()`` for every config (tests/test_config_runs.py).

    >>> from interp import ModelConfig
    >>> parameter_count(ModelConfig(n_layers=1, d_model=4, n_heads=1, d_vocab=10, n_ctx=8))
    364
    """
    stacks = 2 if cfg.architecture == "encoder_decoder" else 1
    total = _embeddings(cfg) + _head(cfg) + _memory(cfg)
    if cfg.positional == "relative":
        total += stacks * cfg.relative_buckets * cfg.n_heads
    if cfg.final_norm and cfg.norm != "none":
        total += stacks * _norm(cfg, cfg.d_model)
    if cfg.architecture == "encoder_decoder":
        total += cfg.n_layers * _block(cfg, cross=False, moe=False)
        return total + cfg.n_decoder_layers * _block(cfg, cross=True, moe=False)
    n_moe = len(cfg.moe_layers) if cfg.is_moe else 0  # distinct indices inside the stack
    if n_moe:
        total += n_moe * _block(cfg, cross=False, moe=True)
    return total + (cfg.n_layers - n_moe) * _block(cfg, cross=False, moe=False)


def model_bytes(cfg: ModelConfig, dtype: torch.dtype | None = None) -> int:
    """Bytes of the parameters in ``dtype`` (default: torch's default dtype), plus the fixed
    sinusoidal position table (float32, built with the model)."""
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    table = cfg.n_ctx * cfg.d_model * 4 if cfg.positional == "sinusoidal" else 0
    return parameter_count(cfg) * itemsize + table


def total_memory_bytes() -> int | None:
    """This machine's physical memory from ``os.sysconf`` (Linux and most Unixes), else None."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf; unknown names
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _gb(n: int) -> str:
    return f"{n / 2**30:,.1f}"


def _too_large(cfg: ModelConfig, memory: int | None) -> InterpError:
    have = f"this machine has {_gb(memory)} GB" if memory else "the allocation failed"
    return InterpError(
        f"this model needs {_gb(model_bytes(cfg))} GB for its parameters; {have}. Choose "
        "smaller sizes (d_model, d_vocab, n_layers, d_mlp, n_ctx, experts)."
    )


def check_fits(cfg: ModelConfig) -> None:
    """Refuse, before allocating, a model whose parameters exceed this machine's memory.

    Only where tensors are built on the CPU (a build on the meta device, as loaders do,
    allocates nothing; a GPU's memory is not the machine's) and the memory is known."""
    if torch.empty(0).device.type != "cpu":  # the device new tensors go to (torch >= 2.2)
        return
    memory = total_memory_bytes()
    if memory is not None and model_bytes(cfg) > memory:
        raise _too_large(cfg, memory)


@contextlib.contextmanager
def allocation_errors(cfg: ModelConfig) -> Iterator[None]:
    """Build a model of ``cfg`` inside this: :func:`check_fits` first, then an allocator
    failure (``MemoryError``, CUDA out of memory, a size past int64) becomes the same one-line
    :class:`InterpError` instead of a C++ message."""
    check_fits(cfg)
    try:
        yield
    except MemoryError:
        raise _too_large(cfg, total_memory_bytes()) from None
    except (RuntimeError, TypeError, OverflowError) as e:
        if isinstance(e, torch.OutOfMemoryError) or any(
            w in str(e).lower() for w in _ALLOCATION_WORDS
        ):
            raise _too_large(cfg, total_memory_bytes()) from None
        raise
