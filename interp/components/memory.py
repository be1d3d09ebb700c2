"""Memory-augmented attention: persistent slots, a kNN store, segment recurrence (XL).

Three ways for a query to see more than its context, one per ``cfg.memory_kind``:

- ``persistent`` (Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory";
  memory tokens, Burtsev et al. 2020): ``n_memory_slots`` learned key-value pairs per layer,
  in one softmax with the context's keys.
- ``knn`` (Wu et al. 2022, Memorizing Transformers): a non-differentiable store of the keys
  and values of earlier forwards; each query retrieves its ``memory_topk`` best keys (exact
  top-k in torch, over at most ``memory_size`` entries), attends over them, and a learned
  per-head gate g mixes ``z = g * z_mem + (1 - g) * z_local``.
- ``xl`` (Dai et al. 2019, Transformer-XL; Rae et al. 2020, Compressive Transformer): the
  layer inputs of earlier segments (``mem_len`` of them; gradient stopped) become keys and
  values under the current weights, in one softmax with the context; states falling out of
  that window are mean-pooled ``cmem_rate`` to one into ``cmem_len`` compressed states.

Every memory forward passes hooks on the attention module (``blocks.{l}.attn.``):
``hook_mem_k`` / ``hook_mem_v`` [batch, mem, kv_head, d_head] (the memory's keys and values),
``hook_mem_scores`` / ``hook_mem_pattern`` [batch, head, q_pos, mem] (over the memory's
entries; for ``knn`` over the ``topk`` retrieved ones), ``hook_mem_indices`` [batch, head,
q_pos, topk] (``knn``: which store entries; editing them replaces what is retrieved) and
``hook_mem_gate`` [head] (``knn``). With ``persistent`` and ``xl`` the context's
``hook_pattern`` and the memory's ``hook_mem_pattern`` share one softmax: together they sum
to 1 per query. The stores are run-time state read and written through ``model.memory``
(:class:`interp.memory.ModelMemory`). Relative positions (RoPE, T5 or ALiBi biases) apply to the
context only: memory entries are stored and scored without them (Wu et al. 2022 use T5 biases
locally and none in memory), so a stored entry matches by content; learned absolute positions
instead stay in the residual stream and so in the memory's keys.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.components.context import AttnContext
from interp.config import ModelConfig
from interp.errors import InterpError
from interp.hooks import hp, is_reached

if TYPE_CHECKING:
    from interp.components.attention import Attention

__all__ = ["AttentionMemory", "MemoryStore", "add_memory_hooks", "has_memory"]

#: ``memory_qk_norm``'s initial cosine scale, log(10): a cosine of 1 against 0.5 then weighs
#: e^5 ~ 150 to 1, sharp enough to pick one of ``memory_topk`` entries from the start
_COS_SCALE_INIT = math.log(10.0)


def has_memory(cfg: ModelConfig, layer: int, cross: bool = False) -> bool:
    """Whether self-attention layer ``layer`` carries the config's memory."""
    if cfg.memory_kind is None or cross:
        return False
    return cfg.memory_layers is None or layer in cfg.memory_layers


def add_memory_hooks(attn: nn.Module, kind: str, gate: bool = True) -> None:
    """The memory's hook points, on the attention module so their names are
    ``blocks.{l}.attn.hook_mem_*`` (the module docstring lists shapes); ``gate`` False: a kNN
    memory with ``memory_joint`` has no gate to hook."""
    attn.hook_mem_k = HookPoint()  # [batch, mem, kv_head, d_head]
    attn.hook_mem_v = HookPoint()  # [batch, mem, kv_head, d_head]
    attn.hook_mem_scores = HookPoint()  # [batch, head, q_pos, mem | topk]
    attn.hook_mem_pattern = HookPoint()  # [batch, head, q_pos, mem | topk]
    if kind == "knn":
        attn.hook_mem_indices = HookPoint()  # [batch, head, q_pos, topk]
        if gate:
            attn.hook_mem_gate = HookPoint()  # [head]


class MemoryStore:
    """One layer's run-time memory: what earlier forwards left for later ones.

    ``knn``: ``k``, ``v`` [batch, entries, kv_head, d_head]. ``xl``: ``states`` [batch, mem_len,
    d_model] (the layer's inputs, gradient stopped) and ``compressed`` [batch, cmem_len,
    d_model]. Empty (None) after :meth:`reset`; ``writing`` False reads without appending;
    ``detach`` False keeps the ``knn`` store in the autograd graph (training through several
    segments of one document, reset every batch)."""

    def __init__(self, kind: str, cfg: ModelConfig):
        self.kind, self.cfg = kind, cfg
        self.writing, self.detach = True, True
        self.reset()

    def reset(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.states: torch.Tensor | None = None
        self.compressed: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-empty parts by name (what ``model.memory.save`` writes)."""
        names = ("k", "v", "states", "compressed")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def batch(self) -> int | None:
        t = next(iter(self.tensors().values()), None)
        return None if t is None else t.shape[0]

    def check_batch(self, batch: int) -> None:
        held = self.batch()
        if held is not None and held != batch:
            raise InterpError(f"The memory holds {held} rows but this forward has {batch}; "
                              "call model.memory.reset() before a batch of another size.")

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add this forward's keys and values; keep the newest ``memory_size``."""
        if not self.writing:
            return
        if self.detach:
            k, v = k.detach(), v.detach()
        n = self.cfg.memory_size
        self.k = k if self.k is None else torch.cat([self.k, k], 1)
        self.v = v if self.v is None else torch.cat([self.v, v], 1)
        self.k, self.v = self.k[:, -n:], self.v[:, -n:]

    def append_states(self, x: torch.Tensor) -> None:
        """Add this segment's layer inputs; states pushed past ``mem_len`` are mean-pooled
        ``cmem_rate`` to one (Rae et al. 2020's pooling compression) into the compressed
        memory, which keeps its newest ``cmem_len``."""
        if not self.writing:
            return
        cfg = self.cfg
        x = x.detach()  # Transformer-XL's stop-gradient on the memory
        states = x if self.states is None else torch.cat([self.states, x], 1)
        old, self.states = states[:, : -cfg.mem_len], states[:, -cfg.mem_len :]
        if cfg.cmem_len == 0 or old.shape[1] == 0:
            return
        r = cfg.cmem_rate
        old = old[:, : old.shape[1] - old.shape[1] % r]  # a ragged tail is dropped
        if old.shape[1] == 0:
            return
        pooled = F.avg_pool1d(old.transpose(1, 2), r, r).transpose(1, 2)
        comp = pooled if self.compressed is None else torch.cat([self.compressed, pooled], 1)
        self.compressed = comp[:, -cfg.cmem_len :]


class AttentionMemory(nn.Module):
    """The memory of one attention layer: its parameters (persistent slots, or the kNN gate)
    and its :class:`MemoryStore`; :meth:`attend` replaces the attention kernel."""

    def __init__(self, cfg: ModelConfig, n_heads: int, n_kv_heads: int, d_head: int):
        super().__init__()
        self.kind = cfg.memory_kind
        if self.kind == "persistent":
            shape = (cfg.n_memory_slots, n_kv_heads, d_head)
            self.slots_k = nn.Parameter(torch.randn(shape) * d_head**-0.5)
            self.slots_v = nn.Parameter(torch.randn(shape) * cfg.init_std)
        if self.kind == "knn" and not cfg.memory_joint:
            # sigmoid(0) = 0.5: local and retrieved attention start equal (Wu et al. 2022)
            self.gate_logit = nn.Parameter(torch.zeros(n_heads))
        if self.kind == "knn" and cfg.memory_qk_norm:  # a cosine score's temperature (log)
            self.mem_log_scale = nn.Parameter(torch.full((n_heads,), _COS_SCALE_INIT))
        self.store = MemoryStore(self.kind, cfg)

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ctx: AttnContext, x: torch.Tensor, q_content: torch.Tensor | None = None,
               k_content: torch.Tensor | None = None) -> torch.Tensor:
        """z [batch, pos, head, d_head] of queries q [batch, pos, head, d_head] over the
        context's keys k and values v [batch, k_pos, kv_head, d_head] and the memory; ``x`` is
        the layer's (normed) input, which XL memory keeps. ``q_content`` / ``k_content`` are q
        and k before RoPE (None: the same): the memory is searched and stored with them, so a
        stored entry matches by content, not by the position it had in its own segment
        (Memorizing Transformers: relative positions locally, none in memory)."""
        B = q.shape[0]
        self.store.check_batch(B)
        q_content = q if q_content is None else q_content
        k_content = k if k_content is None else k_content
        if self.kind == "knn":
            z = self._knn(attn, q, k, v, ctx, q_content)
            self.store.append_kv(k_content, v)
            return z
        if self.kind == "persistent":
            mk = self.slots_k[None].expand(B, -1, -1, -1).to(q.dtype)
            mv = self.slots_v[None].expand(B, -1, -1, -1).to(q.dtype)
        else:
            mk, mv = self._xl_kv(attn, x)
        mk, mv = hp(attn.hook_mem_k, mk), hp(attn.hook_mem_v, mv)
        z = joint_attention(attn, q, k, v, mk, mv, ctx, q_content)
        if self.kind == "xl":
            self.store.append_states(x)
        return z

    def _xl_kv(self, attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the compressed and recent states under today's weights."""
        s = self.store
        parts = [t for t in (s.compressed, s.states) if t is not None]
        B, nkv, dh = x.shape[0], attn.n_kv_heads, attn.d_head
        if not parts:
            empty = x.new_zeros(B, 0, nkv, dh)
            return empty, empty
        h = torch.cat(parts, 1).to(x.dtype)  # [batch, mem, d_model]
        out = attn.qkv(h)
        (_, _), (ks, kn), (vs, vn) = attn._qkv_slices()
        M = h.shape[1]
        return out.narrow(-1, ks, kn).view(B, M, nkv, dh), out.narrow(-1, vs, vn).view(
            B, M, nkv, dh)

    def _knn(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             ctx: AttnContext, q_mem: torch.Tensor) -> torch.Tensor:
        """Attention over the top-k entries of the store (exact search; the store is small),
        queried with q_mem, then mixed with local attention: by the per-head gate, or
        (``memory_joint``) in one softmax with the context's keys."""
        cfg, s = attn.cfg, self.store
        B, T, nh, dh = q.shape
        N = 0 if s.k is None else s.k.shape[1]
        joint = cfg.memory_joint and N > 0
        z_local = None if joint else _local(attn, q, k, v, ctx)
        gate = None if cfg.memory_joint else hp(attn.hook_mem_gate, torch.sigmoid(self.gate_logit))
        mk = s.k if N else q.new_zeros(B, 0, attn.n_kv_heads, dh)
        mv = s.v if N else q.new_zeros(B, 0, attn.n_kv_heads, dh)
        mk, mv = hp(attn.hook_mem_k, mk.to(q.dtype)), hp(attn.hook_mem_v, mv.to(q.dtype))
        kh = attn._repeat_kv(mk).transpose(1, 2)  # [batch, head, mem, d_head]
        vh = attn._repeat_kv(mv).transpose(1, 2)
        qh = q_mem.transpose(1, 2)  # [batch, head, q, d_head]
        scale: torch.Tensor | float = attn.scale / (ctx.temperature if joint else 1.0)
        if cfg.memory_qk_norm:  # a cosine search: no query-independent per-key bias
            qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
            scale = self.mem_log_scale.exp().to(q.dtype)[None, :, None, None]
        topk = min(cfg.memory_topk, N)
        with torch.no_grad():  # the search is not differentiated (Wu et al. 2022)
            idx = (qh @ kh.transpose(-1, -2)).topk(topk, dim=-1).indices
        idx = hp(attn.hook_mem_indices, idx)  # [batch, head, q, topk]
        if N and (idx.min() < 0 or idx.max() >= N):
            raise InterpError(f"hook_mem_indices must index the store's {N} entries "
                              f"(0..{N - 1}); an edit wrote {int(idx.min())}..{int(idx.max())}.")
        flat = idx.reshape(B, nh, T * topk, 1)
        sel_k = kh.gather(2, flat.expand(-1, -1, -1, dh)).view(B, nh, T, topk, dh)
        sel_v = vh.gather(2, flat.expand(-1, -1, -1, dh)).view(B, nh, T, topk, dh)
        scores = torch.einsum("bhqd,bhqkd->bhqk", qh, sel_k) * scale
        scores = hp(attn.hook_mem_scores, scores)
        if joint:
            return _joint_topk(attn, q, k, v, ctx, scores, sel_v)
        pattern = hp(attn.hook_mem_pattern, torch.softmax(scores.float(), -1).to(q.dtype))
        if not N:  # nothing stored yet: the context alone
            return z_local
        z_mem = torch.einsum("bhqk,bhqkd->bqhd", pattern, sel_v)
        g = gate.to(q.dtype)[None, None, :, None]
        return g * z_mem + (1 - g) * z_local


def _local(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           ctx: AttnContext) -> torch.Tensor:
    """The layer's own attention kernel over the context (eager while its hooks are read)."""
    hooked = is_reached(attn.hook_attn_scores) or is_reached(attn.hook_pattern)
    if hooked or attn.cfg.attn_kernel == "eager":
        return attn._eager(q, k, v, ctx)
    return attn._sdpa(q, k, v, ctx)


def _context_scores(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's attention scores [batch, head, q, k] (scaled, position-biased, tempered
    and masked as in the plain kernel; not yet hooked) and its values [batch, head, k, d_head],
    for the one-softmax memory variants."""
    qh = q.transpose(1, 2)
    kh, vh = attn._repeat_kv(k).transpose(1, 2), attn._repeat_kv(v).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * attn.scale
    if ctx.pos_bias is not None:
        scores = scores + ctx.pos_bias.to(scores.dtype)
    if ctx.temperature != 1.0:
        scores = scores / ctx.temperature
    hard = ctx.hard()
    if hard is not None:
        scores = scores.masked_fill(~hard, torch.finfo(scores.dtype).min)
    return scores, vh


def _joint_softmax(attn: Attention, mem_scores: torch.Tensor, scores: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over memory and context scores, split back into the hooked memory pattern
    and context pattern."""
    M = mem_scores.shape[-1]
    both = torch.softmax(torch.cat([mem_scores, scores], -1).float(), -1).to(scores.dtype)
    return hp(attn.hook_mem_pattern, both[..., :M]), hp(attn.hook_pattern, both[..., M:])


def _joint_topk(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: AttnContext, mem_scores: torch.Tensor, sel_v: torch.Tensor
                ) -> torch.Tensor:
    """``memory_joint``: one softmax over each query's retrieved entries (``mem_scores``
    [batch, head, q, topk], values ``sel_v`` [batch, head, q, topk, d_head]) and the context's
    keys, masked and position-biased as usual (Focused Transformer, Tworkowski et al. 2023):
    a query with no match in memory attends locally, and one whose answer lies only in memory
    attends there, without a fixed per-head mix."""
    scores, vh = _context_scores(attn, q, k, v, ctx)
    scores = hp(attn.hook_attn_scores, scores)
    mem_pattern, pattern = _joint_softmax(attn, mem_scores, scores)
    z = pattern @ vh + torch.einsum("bhqk,bhqkd->bhqd", mem_pattern, sel_v)
    return z.transpose(1, 2)


def joint_attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mk: torch.Tensor, mv: torch.Tensor, ctx: AttnContext,
                    q_mem: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over the memory's keys mk and the context's keys k (masked as usual,
    position bias on the context only): z [batch, pos, head, d_head]. ``hook_attn_scores`` /
    ``hook_pattern`` hold the context's part, ``hook_mem_scores`` / ``hook_mem_pattern`` the
    memory's, scored with q_mem (q before RoPE; None: q)."""
    mqh = (q if q_mem is None else q_mem).transpose(1, 2)  # [batch, head, q, d_head]
    mkh, mvh = attn._repeat_kv(mk).transpose(1, 2), attn._repeat_kv(mv).transpose(1, 2)
    scores, vh = _context_scores(attn, q, k, v, ctx)
    mem_scores = (mqh @ mkh.transpose(-1, -2)) * (attn.scale / ctx.temperature)
    scores = hp(attn.hook_attn_scores, scores)
    mem_scores = hp(attn.hook_mem_scores, mem_scores)  # [batch, head, q, mem]
    mem_pattern, pattern = _joint_softmax(attn, mem_scores, scores)
    z = pattern @ vh + mem_pattern @ mvh  # [batch, head, q, d_head]
    return z.transpose(1, 2)
