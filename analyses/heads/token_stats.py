"""Token-level head scores: positional, sinks and delimiters, range, semantic.

Running sums per head over any text (or the repeated random tokens), one pattern at a time:

- **Positional** (Voita et al. 2019, *Analyzing Multi-Head Self-Attention: Specialized Heads
  Do the Heavy Lifting, the Rest Can Be Pruned*, ACL, sec. 4.1: a head is positional when "at
  least 90% of the time its maximum attention weight is assigned to a specific relative
  position"). The quantity is Voita's: an **argmax share**, not a mean attention mass.
  ``top_offset_{o}`` is the share of the queries *where offset o is possible* whose
  most-attended non-sink key sits at q + o. A query counts for offset o when it is a real token
  (not padding, not a special token such as [CLS], [SEP], BOS as :class:`VocabInfo` knows them)
  and key q + o exists and is one the argmax may pick: inside the sequence, not padding, visible
  under the model's mask and not a sink (the first token or a special token). So the last
  token (no next token; in an encoder its next token is [SEP]) does not count against a
  next-token head, nor the first tokens against a previous-token head. ``positional_offset``
  is the offset in -3..+3 (0 excluded) with the largest share, ``positional_share`` that share
  and ``positional_n`` the number of queries it is over. One departure from the paper, kept on
  purpose: the argmax runs over non-sink keys (attention parked on the first token or a special
  token is a no-op, Clark et al. 2019 sec. 3; Xiao et al. 2024), where Voita et al.'s
  translation encoder had no such tokens. Also reported: ``attn_offset_{o}``, the mean
  attention mass at offset o over the real (non-special) queries whose key q + o exists (any
  key, sinks included), and ``mode_offset`` / ``mode_share``, the most frequent argmax offset
  up to 32 and its share of every query with a non-sink key (not conditioned on the offset:
  reported, never labelled).
- **Sinks and delimiters** (Clark et al. 2019, *What Does BERT Look At?*; Xiao et al. 2024,
  *Efficient Streaming Language Models with Attention Sinks*): attention share to the first
  token, BOS, [CLS], [SEP], any special token, punctuation.
- **Range** (Clark et al. 2019 sec. 3): with the sink mass removed and the rest renormalised,
  mean attention distance (and its ratio to a uniform head's), entropy, normalised entropy.
- **Semantic** (our operationalisation): the within-offset correlation of attention with the
  cosine similarity of the tokens' input embeddings (offset as a fixed effect).

Sliding-window layers (``cfg.layer_types`` entries ``"sliding"``: Gemma 3's local layers) see
only the keys within ``cfg.sliding_window`` of the query, so their range scores are measured
within that window: the uniform head of ``distance_ratio`` and the log of the number of keys of
``entropy_norm`` are over the keys the window leaves visible. A long-range sliding head is long
for its window, not for the text; the frame's ``window`` column says which heads that is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.heads.batches import TokenBatch, VocabInfo, is_causal
from analyses.heads.scan import MODE_MAX_OFFSET, OFFSETS, SEMANTIC_MAX_OFFSET, Accumulator
from interp import HookedTransformer
from interp.masks import SlidingWindow


def sliding_layers(model: HookedTransformer) -> tuple[tuple[int, ...], int | None]:
    """The layers that attend within a sliding window (``cfg.layer_types``), and the window;
    ``((), None)`` for a model whose layers all see the whole mask."""
    types = getattr(model.cfg, "layer_types", None)
    window = getattr(model.cfg, "sliding_window", None)
    if not types or window is None:
        return (), None
    return tuple(i for i, t in enumerate(types) if t == "sliding"), int(window)

__all__ = ["TokenStats"]


class TokenStats(Accumulator):
    """Positional, sink/delimiter, range and semantic sums per head (see the module docstring)."""

    KINDS = ("first", "bos", "cls", "sep", "special", "punct")
    SUMS = ("top", "top_all", "n_top", "n_pos", "off", "n_off", "kind", "n_q", "dist", "udist",
            "ent", "entn", "n_range", "sa", "saa", "sas", "sn", "ss", "sss", "n_tokens", "n_seqs")

    def __init__(self, model: HookedTransformer, vocab: VocabInfo, *, semantic: bool = True):
        self.L, self.H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        self.vocab, self.causal = vocab, is_causal(model)
        self.mask = model.effective_mask
        self.soft = model.cfg.soft_mask_penalty is not None
        self.sliding, self.window = sliding_layers(model)
        self.local: tuple[torch.Tensor, ...] | None = None  # range terms within the window
        self.device = model.W_E.device
        self.W_E = model.W_E.detach() if semantic else None
        L, H, K, n_off = self.L, self.H, len(self.KINDS), len(OFFSETS)
        f = dict(dtype=torch.float64, device=self.device)
        self.top = torch.zeros(L, H, n_off, **f)
        self.top_all = torch.zeros(L, H, 2 * MODE_MAX_OFFSET + 1, **f)  # argmax offsets -32..+32
        self.n_top = 0.0
        self.n_pos = torch.zeros(n_off, **f)  # queries where each offset is possible
        self.off = torch.zeros(L, H, n_off, **f)
        self.n_off = torch.zeros(n_off, **f)
        self.kind = torch.zeros(L, H, K, **f)
        self.n_q = 0.0
        self.dist = torch.zeros(L, H, **f)
        self.udist = torch.zeros(L, H, **f)
        self.ent = torch.zeros(L, H, **f)
        self.entn = torch.zeros(L, H, **f)
        self.n_range = torch.zeros(L, H, **f)
        NB = 2 * SEMANTIC_MAX_OFFSET + 1
        self.sa = torch.zeros(L, H, NB, **f)
        self.saa = torch.zeros(L, H, NB, **f)
        self.sas = torch.zeros(L, H, NB, **f)
        self.sn = torch.zeros(NB, **f)
        self.ss = torch.zeros(NB, **f)
        self.sss = torch.zeros(NB, **f)
        self.n_tokens = 0
        self.n_seqs = 0

    # ------------------------------------------------------------------ per batch
    def _kinds(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(kinds [B, T, K] one-hot of first/BOS/CLS/SEP/special/punct, special, punct)."""
        B, T = tokens.shape
        v = self.vocab
        kinds = torch.zeros(B, T, len(self.KINDS), device=self.device)
        kinds[:, 0, 0] = 1.0
        for j, tid in ((1, v.bos_id), (2, v.cls_id), (3, v.sep_id)):
            if tid is not None:
                kinds[..., j] = (tokens == tid).float()
        special = torch.zeros_like(tokens, dtype=torch.bool)
        if v.special_ids:
            special = torch.isin(tokens, torch.tensor(v.special_ids, device=self.device))
        kinds[..., 4] = special.float()
        if v.punct is not None:
            punct = v.punct.to(self.device)[tokens]
        else:
            punct = torch.zeros_like(special)
        kinds[..., 5] = punct.float()
        return kinds * valid[..., None], special, punct

    def begin(self, batch: TokenBatch) -> None:
        tokens, valid = batch.tokens.to(self.device), batch.valid.to(self.device)
        B, T = tokens.shape
        ar = torch.arange(T, device=self.device)
        kinds, special, punct = self._kinds(tokens, valid)
        self.kinds = kinds
        self.qv = valid.float()  # [B, T] queries
        self.n_q += float(valid.sum())
        # real queries for the positional scores: not padding, not a special token's row
        # ([CLS], [SEP], BOS, ... as the vocabulary knows them)
        real = valid & ~special & ~(kinds[..., 1:4] > 0).any(-1)
        self.off_mask = []
        for j, o in enumerate(OFFSETS):
            lo, hi = max(0, -o), T - max(0, o)  # queries q whose q + o is inside the sequence
            qm = (real[:, lo:hi] & valid[:, max(0, o): T - max(0, -o)]).float()
            self.off_mask.append(qm)
            self.n_off[j] += float(qm.sum())
        # visible keys per query under the model's mask and the padding
        if self.soft:
            vis = torch.ones(T, T, dtype=torch.bool, device=self.device)
        else:
            vis = self.mask.build(T, T, device=self.device)
        vis = vis[None] & valid[:, None, :] & valid[:, :, None]  # [B, q, k]
        sink = (kinds[..., 0] + kinds[..., 4]).clamp(max=1.0) > 0  # first or special
        self.nonsink = (valid & ~sink).float()  # [B, k]
        keys = vis & ~sink[:, None, :]
        n_keys = keys.sum(-1).float()  # [B, q]
        self.D = (ar[:, None] - ar[None, :]).abs().float()  # [q, k]
        self.udist_q, self.logn, self.range_q = self._range_terms(keys, valid)
        if self.sliding and not self.soft:  # the same terms over the keys the window leaves
            band = SlidingWindow(self.window).build(T, T, device=self.device)
            self.local = self._range_terms(keys & band[None], valid)
        # the positional argmax runs over non-sink keys: attention parked on the first token or
        # a special token is a no-op (Clark et al. 2019 sec. 3; Xiao et al. 2024), not a position
        self.top_keys = keys
        q_top = valid & (n_keys >= 1)
        self.q_top = q_top.float()
        self.n_top += float(q_top.sum())
        # where each offset is possible (Voita's share is taken over these queries): a real
        # query whose key q + o is one the argmax may pick (visible, not padding, not a sink)
        self.pos_q = []
        for j, o in enumerate(OFFSETS):
            lo, hi = max(0, -o), T - max(0, o)
            ok = torch.zeros(B, T, dtype=torch.bool, device=self.device)
            if hi > lo:
                ok[:, lo:hi] = keys.diagonal(offset=o, dim1=1, dim2=2) & real[:, lo:hi]
            self.pos_q.append(ok)
            self.n_pos[j] += float(ok.sum())
        self.n_tokens += int(valid.sum())
        self.n_seqs += B
        self.sem = None
        if self.W_E is not None:
            self._semantic_pairs(tokens, keys, punct, sink)

    def _range_terms(self, keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per query, over its visible non-sink ``keys`` [B, q, k]: a uniform head's mean
        distance, the log of the number of keys, and whether the range scores apply (>= 2)."""
        n_keys = keys.sum(-1).float()  # [B, q]
        uniform = (keys.float() * self.D).sum(-1) / n_keys.clamp(min=1)
        return (torch.where(n_keys > 0, uniform, 0.0), torch.log(n_keys.clamp(min=1)),
                valid & (n_keys >= 2))

    def _semantic_pairs(self, tokens: torch.Tensor, keys: torch.Tensor, punct: torch.Tensor,
                        sink: torch.Tensor) -> None:
        """Embedding similarity of every scored (query, key) pair, with its offset bucket."""
        B, T = tokens.shape
        ar = torch.arange(T, device=self.device)
        emb = torch.nn.functional.normalize(self.W_E[tokens].float(), dim=-1)
        sim = emb @ emb.transpose(1, 2)  # [B, q, k]
        distinct = tokens[:, :, None] != tokens[:, None, :]
        ok = keys & ~punct[:, None, :] & distinct & ~sink[:, :, None]
        ok &= ~torch.eye(T, dtype=torch.bool, device=self.device)[None]
        idx = ok.reshape(-1).nonzero()[:, 0]
        if len(idx):
            M = SEMANTIC_MAX_OFFSET
            rel = (ar[None, :] - ar[:, None]).clamp(-M, M) + M
            bucket = rel[None].expand(B, T, T).reshape(-1)[idx]
            s = sim.reshape(-1)[idx].double()
            self.sn.index_add_(0, bucket, torch.ones_like(s))
            self.ss.index_add_(0, bucket, s)
            self.sss.index_add_(0, bucket, s * s)
            self.sem = (idx, bucket, s)

    # ------------------------------------------------------------------ per layer
    def update(self, layer: int, pattern: torch.Tensor) -> None:
        p = pattern.float()  # [B, H, q, k]
        self._positional(layer, p)
        qv = self.qv[:, None, :, None]
        share = torch.einsum("bhqk,bkn->bhqn", p, self.kinds) * qv
        self.kind[layer] += share.sum((0, 2)).double()
        self._range(layer, p)
        if self.sem is not None:
            idx, bucket, s = self.sem
            H = p.shape[1]
            a = p.transpose(0, 1).reshape(H, -1)[:, idx].double()  # [H, pairs]
            # idx indexes the flattened [B, q, k]; transpose(0,1) gives [H, B, q, k] -> same order
            self.sa[layer].index_add_(1, bucket, a)
            self.saa[layer].index_add_(1, bucket, a * a)
            self.sas[layer].index_add_(1, bucket, a * s[None])

    def _positional(self, layer: int, p: torch.Tensor) -> None:
        B, H, T, _ = p.shape
        ar = torch.arange(T, device=p.device)
        rel = p.masked_fill(~self.top_keys[:, None], -1.0).argmax(-1) - ar  # [B, H, q]
        for j, o in enumerate(OFFSETS):
            hits = (rel == o) & self.pos_q[j][:, None, :]  # [B, H, q]
            self.top[layer, :, j] += hits.sum((0, 2)).double()
        nb = 2 * MODE_MAX_OFFSET + 1
        heads = nb * torch.arange(H, device=p.device)[None, :, None]
        bins = (rel.clamp(-MODE_MAX_OFFSET, MODE_MAX_OFFSET) + MODE_MAX_OFFSET) + heads
        w = self.q_top[:, None, :].expand(B, H, T)
        counts = torch.bincount(bins.reshape(-1), weights=w.reshape(-1), minlength=H * nb)
        self.top_all[layer] += counts.view(H, nb).double()
        for j, o in enumerate(OFFSETS):
            d = p.diagonal(offset=o, dim1=2, dim2=3)  # [B, H, T-|o|]: query q -> key q+o
            self.off[layer, :, j] += (d * self.off_mask[j][:, None, :]).sum((0, 2)).double()

    def _range(self, layer: int, p: torch.Tensor) -> None:
        udist_q, logn, range_q = self.udist_q, self.logn, self.range_q
        if self.local is not None and layer in self.sliding:
            udist_q, logn, range_q = self.local
        pn = p * self.nonsink[:, None, None, :]
        r = pn.sum(-1)  # [B, H, q] non-sink mass
        use = range_q[:, None, :] & (r > 1e-4)
        rs = r.clamp(min=1e-12)
        dist = torch.einsum("bhqk,qk->bhq", pn, self.D) / rs
        plogp = torch.where(pn > 0, pn * torch.log(pn.clamp(min=1e-30)), 0.0).sum(-1)
        ent = -plogp / rs + torch.log(rs)
        entn = ent / logn[:, None, :].clamp(min=1e-12)
        u = use.double()
        self.dist[layer] += (dist.double() * u).sum((0, 2))
        self.udist[layer] += (udist_q[:, None, :].double() * u).sum((0, 2))
        self.ent[layer] += (ent.double() * u).sum((0, 2))
        self.entn[layer] += (entn.double() * u).sum((0, 2))
        self.n_range[layer] += u.sum((0, 2))

    # ------------------------------------------------------------------ result
    def frame(self) -> pd.DataFrame:
        L, H = self.L, self.H
        rows: dict[str, Any] = {
            "layer": np.repeat(np.arange(L), H),
            "head": np.tile(np.arange(H), L),
        }
        top = (self.top / self.n_pos.clamp(min=1)).cpu().numpy().reshape(L * H, -1)
        off = (self.off / self.n_off.clamp(min=1)).cpu().numpy().reshape(L * H, -1)
        for j, o in enumerate(OFFSETS):
            rows[f"top_offset_{o:+d}"] = top[:, j]
        for j, o in enumerate(OFFSETS):
            rows[f"attn_offset_{o:+d}"] = off[:, j]
        rows["prev_token"] = off[:, OFFSETS.index(-1)]
        cand = [j for j, o in enumerate(OFFSETS) if o != 0]
        best = np.array(cand)[top[:, cand].argmax(1)]
        rows["positional_offset"] = np.array(OFFSETS)[best]
        rows["positional_share"] = top[np.arange(L * H), best]
        rows["positional_n"] = self.n_pos.cpu().numpy().astype(np.int64)[best]
        top_all = (self.top_all / max(self.n_top, 1.0)).cpu().numpy().reshape(L * H, -1)
        mode = top_all.argmax(1)
        rows["mode_offset"] = mode - MODE_MAX_OFFSET  # most frequent argmax offset
        rows["mode_share"] = top_all[np.arange(L * H), mode]
        kind = (self.kind / max(self.n_q, 1.0)).cpu().numpy().reshape(L * H, -1)
        for j, k in enumerate(self.KINDS):
            rows["sink_first" if k == "first" else k] = kind[:, j]
        rows["sink"] = kind[:, :4].max(1)
        n = self.n_range.clamp(min=1)
        nan = (self.n_range == 0).cpu().numpy().reshape(-1)
        for name, t in (("mean_distance", self.dist / n), ("entropy", self.ent / n),
                        ("entropy_norm", self.entn / n)):
            x = t.cpu().numpy().reshape(-1)
            x[nan] = np.nan
            rows[name] = x
        ratio = (self.dist / self.udist.clamp(min=1e-12)).cpu().numpy().reshape(-1)
        ratio[nan | (self.udist.cpu().numpy().reshape(-1) <= 0)] = np.nan
        rows["distance_ratio"] = ratio
        rows["semantic"] = self._semantic().reshape(-1)
        if self.sliding:  # the window a head's range scores are within (NaN: the whole mask)
            win = np.full((L, H), np.nan)
            win[list(self.sliding)] = self.window
            rows["window"] = win.reshape(-1)
        return pd.DataFrame(rows)

    def _semantic(self) -> np.ndarray:
        """Pooled within-offset correlation (offset fixed effects removed from both variables)."""
        if self.W_E is None:
            return np.full((self.L, self.H), np.nan)
        n = self.sn.clamp(min=1)
        keep = (self.sn >= 2).double()
        cov = ((self.sas - self.sa * self.ss / n) * keep).sum(-1)
        va = ((self.saa - self.sa**2 / n) * keep).sum(-1)
        vs = ((self.sss - self.ss**2 / n) * keep).sum()
        r = cov / torch.sqrt((va * vs).clamp(min=1e-300))
        r = torch.where((va > 1e-18) & (vs > 1e-18), r, torch.full_like(r, float("nan")))
        return r.cpu().numpy()
