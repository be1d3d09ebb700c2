"""Causal tracing (Meng, Bau, Andonian and Belinkov 2022, "Locating and Editing Factual
Associations in GPT", NeurIPS): which hidden states carry a fact from the subject to the answer.

:func:`causal_trace` corrupts the subject's token embeddings with Gaussian noise (3 x the
embeddings' standard deviation, several samples) or by replacing the subject with another one of
the same token length (symmetric token replacement, Zhang and Nanda 2024, "Towards Best
Practices of Activation Patching in Language Models: Metrics and Methods", ICLR), then restores
the clean state at each (layer, position) for the residual stream, the MLP output and the
attention output (MLP and attention over a window of layers around the centre, and MLP one layer
alone beside it); the indirect effect is P(answer | restored) - P(answer | corrupted).
:func:`average_trace` averages it per position role (Meng et al. Fig. 2).

Speed: the restorations of one position run as one batch, each row joining at its first restored
layer from the cached corrupted stream (:mod:`analyses.ffn.stream`), and compute only positions
at or after the restored one, reading earlier positions' keys and values from the corrupted
run's KV cache (a causal model's earlier positions cannot change). An MLP restoration skips its
first block where ``resid_post = resid_mid + mlp_out`` (pre-norm blocks): that block's other
positions are the corrupted run's, so the row enters after it with the corrupted ``resid_mid``
plus the clean MLP output at the restored position (2.6% of SmolLM2's tracing products). The
last block's MLP runs at the last position only: nothing reads the other positions after it
(4.5% of the token-layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from analyses import distributed
from analyses.ffn.prepare import PreparedFact
from analyses.ffn.readout import _token_str, _unembed, answer_probs, check_model, dense_layers
from analyses.ffn.stream import staggered_forward
from interp import HookedTransformer, KVCache
from interp.errors import InterpError
from interp.progress import Progress, no_progress

POSITION_ROLES = ("subject_first", "subject_middle", "subject_last", "subsequent_first",
                  "subsequent_further", "last")
TRACE_KINDS = ("resid", "mlp", "attn")
_HOOK_OF_KIND = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}


# ------------------------------------------------------------------ what is restored, where
def default_window(n_layers: int) -> int:
    """Layers restored together for MLP/attention: Meng et al. used 10 of GPT-2 XL's 48;
    smaller models get min(10, n_layers // 3 + 1) so a window never spans most of the model."""
    return max(1, min(10, n_layers // 3 + 1))


def _window_layers(centre: int, window: int, n_layers: int) -> range:
    """Meng et al.'s window: ``window`` layers centred on ``centre``, clipped to the model."""
    return range(max(0, centre - window // 2), min(n_layers, centre - (-window // 2)))


def _position_role(p: int, span: tuple[int, int], n: int) -> str:
    """Meng et al.'s position group of position ``p`` (subject ``span``, ``n`` tokens)."""
    s0, s1 = span
    if s0 <= p < s1:
        if p == s1 - 1:
            return "subject_last"
        return "subject_first" if p == s0 else "subject_middle"
    if p == n - 1:
        return "last"
    return "subsequent_first" if p == s1 else "subsequent_further"


def _subject_embed_std(model: HookedTransformer, facts: Sequence[PreparedFact]) -> float:
    """Std of the subjects' token embeddings (Meng et al.'s ``collect_embedding_std``)."""
    ids = torch.tensor(sorted({t for f in facts
                               for t in f.tokens[f.subject_span[0]:f.subject_span[1]]}),
                       device=model.device)
    return float(model.W_E.detach()[ids].float().std())


def _replacements(f: PreparedFact, facts: Sequence[PreparedFact], n: int,
                  gen: torch.Generator) -> list[tuple[int, ...]]:
    """Up to ``n`` other subjects with the same token length, for symmetric token replacement
    (Zhang and Nanda 2024): subjects of ``facts`` other than ``f``'s, from facts with other
    answers."""
    length = f.subject_span[1] - f.subject_span[0]
    mine = f.tokens[f.subject_span[0]:f.subject_span[1]]
    pool, seen = [], set()
    for g in facts:
        sub = g.tokens[g.subject_span[0]:g.subject_span[1]]
        if len(sub) == length and sub != mine and g.answer_id != f.answer_id and sub not in seen:
            seen.add(sub)
            pool.append(sub)
    if not pool:
        return []
    order = torch.randperm(len(pool), generator=gen).tolist()
    return [pool[j] for j in order[:n]]


@dataclass
class _Patch:
    kind: str  # resid / mlp / attn / mlp_single / attn_single
    layer: int  # centre layer (resid: the restored hook_resid_post)
    pos: int
    start: int  # first block that must run
    restore: tuple[int, ...]  # layers whose mlp/attn output is restored (empty for resid)
    hook: str | None  # hook_mlp_out / hook_attn_out

    @property
    def enters_after_mlp(self) -> bool:
        """An mlp kind on blocks where resid_post = resid_mid + mlp_out: the first restored
        block does not run (its other positions equal the corrupted run's); the row enters
        after it with the corrupted resid_mid + the clean mlp_out at ``pos``."""
        return bool(self.restore) and self.start > self.restore[0]


def _traced_positions(fact: PreparedFact, positions: str) -> list[int]:
    """Every position from the subject on, or (``roles``) one per Meng et al. role: the first,
    middle-most and last subject token, the first and middle-most further token, the last."""
    s0, T = fact.subject_span[0], len(fact.tokens)
    every = list(range(s0, T))
    if positions == "all":
        return every
    by_role: dict[str, list[int]] = {}
    for p in every:
        by_role.setdefault(_position_role(p, fact.subject_span, T), []).append(p)
    return sorted(ps[(len(ps) - 1) // 2] for ps in by_role.values())


def _mlp_adds_to_resid_mid(model: HookedTransformer) -> bool:
    """Whether every block ends ``resid_post = resid_mid + mlp_out`` (pre-norm, sandwich or
    post-branch norms, sequential attention then MLP, no cross-attention), so restoring one
    position's MLP output leaves the block's other positions as they were."""
    # parallel and attention-only blocks have no hook_resid_mid; post-norm ones norm the sum
    return model.cfg.norm_placement != "post" and all(
        hasattr(b, "hook_resid_mid") and hasattr(b, "hook_mlp_out")
        and not getattr(b, "has_cross", False) for b in model.blocks)


def _mlp_runs_after_attention(model: HookedTransformer, layer: int) -> bool:
    """Whether block ``layer`` feeds its MLP through ``hook_mlp_in`` and adds (or norms) the
    MLP output onto its stream, so the MLP input can be cut to the last position and the
    block's last position stays exact (the others broadcast and are never read)."""
    b = model.blocks[layer]
    return (layer in dense_layers(model) and hasattr(b, "hook_mlp_in")
            and hasattr(b, "hook_mlp_out") and not getattr(b, "has_cross", False))


def _last_position_only(act: torch.Tensor, hook: Any) -> torch.Tensor:
    """``hook_mlp_in`` of the last block: only the last position goes on into the MLP."""
    return act[:, -1:]


def _build_patches(model: HookedTransformer, fact: PreparedFact, kinds: Sequence[str],
                   window: int, single_kinds: Sequence[str],
                   positions: str = "all") -> list[_Patch]:
    """Every restoration of one fact: each (kind, centre layer, traced position)."""
    L = model.cfg.n_layers
    traced = _traced_positions(fact, positions)
    has_mlp = set(dense_layers(model)) | {i for i, b in enumerate(model.blocks)
                                         if hasattr(b, "mlp")}
    skip_first = _mlp_adds_to_resid_mid(model)
    patches: list[_Patch] = []
    specs = [(k, window) for k in kinds]
    if window > 1:
        specs += [(f"{k}_single", 1) for k in single_kinds]
    for kind, w in specs:
        base = kind.split("_")[0]
        for layer in range(L):
            for pos in traced:
                if base == "resid":
                    patches.append(_Patch(kind, layer, pos, layer + 1, (), None))
                    continue
                layers = tuple(i for i in _window_layers(layer, w, L)
                               if base != "mlp" or i in has_mlp)
                if not layers:
                    continue
                enters = skip_first and base == "mlp"
                patches.append(_Patch(kind, layer, pos, layers[0] + enters, layers,
                                      _HOOK_OF_KIND[base]))
    return patches


# ------------------------------------------------------------------ the runs of one fact
def _clean_run(model: HookedTransformer, fact: PreparedFact,
               patches: list[_Patch]) -> tuple[float, Any]:
    """P(answer) on the clean prompt, and the clean states the patches restore."""
    L = model.cfg.n_layers
    clean = torch.tensor([fact.tokens], device=model.device)
    need = {f"blocks.{i}.hook_resid_post" for i in range(L)}
    need |= {f"blocks.{i}.{h}" for p in patches if p.hook for i in p.restore for h in [p.hook]}
    hidden, cache = model.run_with_cache(clean, return_type="hidden",
                                         names_filter=lambda n: n in need)
    p_clean = float(torch.softmax(_unembed(model, hidden[0, -1]), -1)[fact.answer_id])
    return p_clean, cache


def _corrupted_run(model: HookedTransformer, fact: PreparedFact, corrupted: torch.Tensor,
                   noise: torch.Tensor | None, mid: bool = False
                   ) -> tuple[float, KVCache, list[torch.Tensor], list[torch.Tensor]]:
    """P(answer) on the corrupted rows (mean over samples), their KV cache, the corrupted
    stream entering each block (``resid_in[L]``: after the last block) and, with ``mid``,
    each block's ``hook_resid_mid`` (else an empty list)."""
    L = model.cfg.n_layers
    s0, s1 = fact.subject_span
    kv = KVCache(L)
    pre_names = [f"blocks.{i}.hook_resid_pre" for i in range(L)]
    mid_names = [f"blocks.{i}.hook_resid_mid" for i in range(L)] if mid else []
    hooks = []
    if noise is not None:
        def add_noise(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            act[:, s0:s1] = act[:, s0:s1] + noise.to(act.dtype)
            return act
        hooks.append(("hook_embed", add_noise))
    corr_cache: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        corr_cache[hook.name] = act

    last_post = f"blocks.{L - 1}.hook_resid_post"
    hooks += [(n, keep) for n in [*pre_names, last_post, *mid_names]]
    with model.hooks(fwd_hooks=hooks):
        c_hidden = model(corrupted, past_kv=kv, return_type="hidden")
    resid_in = [corr_cache[n] for n in [*pre_names, last_post]]
    p_corr = float(torch.softmax(_unembed(model, c_hidden[:, -1]), -1)[:, fact.answer_id].mean())
    return p_corr, kv, resid_in, [corr_cache[n] for n in mid_names]


def _restore_hook(items: list[tuple[torch.Tensor, int, torch.Tensor]]) -> Callable:
    """A hook writing clean ``value`` s into rows ``rows`` at position ``at`` of its activation
    (only the rows already in the batch: a row's index never changes, see
    :mod:`analyses.ffn.stream`)."""
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        for rows, at, value in items:
            act[rows, at] = value.to(act.dtype)
        return act
    return hook


def _restored_finals(model: HookedTransformer, fact: PreparedFact, patches: list[_Patch],
                     members: list[int], pos: int, cache: Any, kv: KVCache,
                     resid_in: list[torch.Tensor], resid_mid: list[torch.Tensor],
                     n_samples: int) -> torch.Tensor:
    """The final hidden state [len(members) * n_samples, d_model] of the restored runs of
    ``patches[members]`` (sorted by start layer; positions from ``pos`` on), as one staggered
    stream (:func:`analyses.ffn.stream.staggered_forward`): a patch's rows join at its start
    layer. Row r uses corruption sample r % n_samples."""
    S, dev = n_samples, model.device
    starts = [patches[j].start for j in members for _ in range(S)]
    rows_sample = torch.arange(S, device=dev).repeat(len(members))

    def entering(layer: int, lo: int, hi: int) -> torch.Tensor:
        residual = resid_in[layer][rows_sample[lo:hi], pos:].clone()  # [rows, T - pos, d_model]
        for k in range(lo // S, hi // S):
            p = patches[members[k]]
            if p.kind == "resid":
                residual[k * S - lo:(k + 1) * S - lo, p.pos - pos] = (
                    cache[f"blocks.{p.layer}.hook_resid_post"][0, p.pos])
            elif p.enters_after_mlp:  # what the skipped block would have written there
                a = p.restore[0]
                residual[k * S - lo:(k + 1) * S - lo, p.pos - pos] = (
                    resid_mid[a][:, p.pos] + cache[f"blocks.{a}.{p.hook}"][0, p.pos])
        return residual

    # per layer: the hooks restoring clean outputs, as (row index, position, value) per patch
    by_layer: dict[int, dict[str, list[tuple[int, int, int]]]] = {}
    for k, j in enumerate(members):
        p = patches[j]
        for layer in p.restore:
            if layer < p.start:  # a block the row does not run (enters_after_mlp)
                continue
            by_layer.setdefault(layer, {}).setdefault(f"blocks.{layer}.{p.hook}", []).append(
                (k * S, (k + 1) * S, p.pos - pos))

    # The last block's MLP runs at the last position only: the other positions' outputs
    # reach nothing (only their keys and values feed the last position, and the MLP comes
    # after them); on SmolLM2 that MLP work is 4.5% of the tracing's token-layers.
    last_block = model.cfg.n_layers - 1
    trim = len(fact.tokens) - pos > 1 and _mlp_runs_after_attention(model, last_block)
    last_at = len(fact.tokens) - 1 - pos

    def hooks(layer: int, n: int) -> list[Any]:
        out = []
        trimmed = trim and layer == last_block
        if trimmed:
            out.append((f"blocks.{layer}.hook_mlp_in", _last_position_only))
        for name, spans in by_layer.get(layer, {}).items():
            rows: dict[int, list[torch.Tensor]] = {}  # rows restored at each position
            for a, b, at in spans:
                if b <= n:
                    rows.setdefault(at, []).append(torch.arange(a, b, device=dev))
            items = [(torch.cat(r), at, cache[name][0, at + pos]) for at, r in rows.items()]
            if trimmed and name.endswith("hook_mlp_out"):  # one position left: the last
                items = [(r, 0, v) for r, at, v in items if at == last_at]
            out.append((name, _restore_hook(items)))
        return out

    def past(layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if pos == 0:
            return None
        entry = kv.layers[layer]
        return entry.k[rows_sample[:n], :pos], entry.v[rows_sample[:n], :pos]

    dummy = torch.tensor([fact.tokens], device=dev)[:, pos:].expand(len(starts), -1)
    return staggered_forward(model, starts, dummy, entering, past, hooks)[:, -1]


@torch.no_grad()
def _trace_one(model: HookedTransformer, fact: PreparedFact, corrupted: torch.Tensor,
               noise: torch.Tensor | None, patches: list[_Patch], max_rows: int,
               merge_positions: bool) -> tuple[float, float, dict[int, float]]:
    """Clean prob, corrupted prob, and restored prob per patch (averaged over samples)."""
    S, T = corrupted.shape
    p_clean, cache = _clean_run(model, fact, patches)
    p_corr, kv, resid_in, resid_mid = _corrupted_run(
        model, fact, corrupted, noise, mid=any(p.enters_after_mlp for p in patches))
    # Rows of one position run as one stream whatever their start layer. With
    # merge_positions, every position of the fact is recomputed from the first restored one
    # (one stream); otherwise each position's stream runs only positions >= its own.
    first_pos = min(p.pos for p in patches) if patches else 0
    groups: dict[int, list[int]] = {}
    for j in sorted(range(len(patches)), key=lambda j: patches[j].start):
        groups.setdefault(first_pos if merge_positions else patches[j].pos, []).append(j)
    finals: list[torch.Tensor] = []
    order: list[int] = []
    for pos, members in groups.items():
        width = max(1, max_rows // (S * (T - pos)))
        for c in range(0, len(members), width):
            chunk = members[c:c + width]
            finals.append(_restored_finals(model, fact, patches, chunk, pos, cache, kv,
                                           resid_in, resid_mid, S))
            order += chunk
    # one unembedding for every restored run, in one reused buffer (readout.answer_probs)
    probs = answer_probs(model, torch.cat(finals), fact.answer_id)[0]
    probs = probs.view(len(order), S).mean(1)
    restored = {j: float(probs[k]) for k, j in enumerate(order)}
    return p_clean, p_corr, restored


# ------------------------------------------------------------------ the method
def _checked_window(n_layers: int, kinds: Sequence[str], single_kinds: Sequence[str],
                    corruptions: Sequence[str], n_samples: int, n_replacements: int | None,
                    window: int | None, positions: str) -> int:
    """The window to use (:func:`default_window` when None), after raising
    :class:`InterpError` for an unknown kind, corruption or position mode, or a non-positive
    count."""
    bad = [k for k in kinds if k not in TRACE_KINDS]
    bad += [k for k in single_kinds if k not in ("mlp", "attn")]
    if bad:
        raise InterpError(f"Unknown trace kind(s) {bad}; valid: {', '.join(TRACE_KINDS)} "
                          "(single: mlp, attn).")
    bad = [c for c in corruptions if c not in ("noise", "replace")]
    if bad:
        raise InterpError(f"Unknown corruption(s) {bad}; valid: noise, replace.")
    for name, v in (("n_samples", n_samples), ("n_replacements", n_replacements)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise InterpError(f"{name} must be a positive integer, got {v!r}.")
    window = default_window(n_layers) if window is None else int(window)
    if window < 1:
        raise InterpError(f"window must be >= 1 layer, got {window}.")
    if positions not in ("all", "roles"):
        raise InterpError(f"positions must be 'all' or 'roles', got {positions!r}.")
    return window


def _corrupt(model: HookedTransformer, f: PreparedFact, corruption: str, n_samples: int,
             noise_scale: float, std: float, pool: Sequence[PreparedFact], n_replacements: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The corrupted prompts [samples, pos] and the embedding noise (``noise``) for one fact;
    None when ``replace`` finds no other subject of the same token length."""
    s0, s1 = f.subject_span
    dev = model.device
    if corruption == "noise":
        noise = torch.randn((n_samples, s1 - s0, model.cfg.d_model), generator=gen)
        return torch.tensor([f.tokens] * n_samples, device=dev), (noise * noise_scale * std).to(dev)
    subs = _replacements(f, pool, n_replacements, gen)
    if not subs:
        return None
    rows = [list(f.tokens[:s0]) + list(s) + list(f.tokens[s1:]) for s in subs]
    return torch.tensor(rows, device=dev), None


def causal_trace(model: HookedTransformer, facts: Sequence[PreparedFact], *,
                 kinds: Sequence[str] = TRACE_KINDS, single_kinds: Sequence[str] = ("mlp",),
                 corruptions: Sequence[str] = ("noise", "replace"), n_samples: int = 5,
                 n_replacements: int | None = None, noise_scale: float = 3.0,
                 window: int | None = None, positions: str = "all", seed: int = 0,
                 max_rows: int = 4096, merge_positions: bool = False,
                 subject_pool: Sequence[PreparedFact] | None = None,
                 progress: Progress = no_progress) -> pd.DataFrame:
    """Causal tracing (Meng et al. 2022, Sec. 2.1) with noise and token-replacement corruption.

    For each fact: a clean run; a corrupted run (``noise``: Gaussian noise of std
    ``noise_scale`` x the subject embeddings' std added to the subject's token embeddings at
    ``hook_embed``, ``n_samples`` draws; ``replace``: the subject swapped for up to
    ``n_replacements`` (default ``n_samples``) other subjects of the same token length with
    other answers, drawn from ``subject_pool`` (default ``facts``), Zhang and Nanda 2024); then,
    for every layer and every position from the subject on, a run that restores the clean state:
    ``resid`` (``hook_resid_post`` of that layer), ``mlp`` / ``attn`` (``hook_mlp_out`` /
    ``hook_attn_out`` over ``window`` layers centred there, Meng et al.'s window, default
    :func:`default_window`), and ``<kind>_single`` (one layer, for ``single_kinds``; shown
    beside the window because a window can be dominated by one layer). Positions before the
    subject are not traced: a causal model's state there is the same in both runs.
    ``positions="roles"`` traces one position per role (the middle-most of several middle
    subject or further tokens), which is what the averaged heatmaps need, at a fraction of
    the cost for long prompts.

    Batching: the restorations of one position run as one stream of at most ``max_rows``
    token positions (rows x positions), each joining at its own start layer
    (:func:`analyses.ffn.stream.staggered_forward`); ``merge_positions`` recomputes every
    traced position for all of them (one stream per fact, more operations) instead of only
    positions >= the restored one (the default). Both give the same numbers.

    Columns: ``fact, corruption, kind, window, layer, position, token, role`` (Meng et al.'s
    position groups: subject_first/middle/last, subsequent_first/further, last),
    ``clean_prob, corrupt_prob, restored_prob, indirect_effect`` (restored - corrupted, the
    probability of the answer's first token, averaged over samples) and ``n_samples``.
    """
    check_model(model)
    window = _checked_window(model.cfg.n_layers, kinds, single_kinds, corruptions, n_samples,
                             n_replacements, window, positions)
    std = _subject_embed_std(model, facts) if facts else 0.0
    gen = torch.Generator().manual_seed(seed)
    pool = facts if subject_pool is None else subject_pool
    n_repl = n_samples if n_replacements is None else n_replacements
    per_fact: dict[int, list[dict]] = {}
    for i in progress(range(len(facts)), desc="causal tracing", total=len(facts)):
        f = facts[i]
        if not distributed.mine(i):  # another rank's fact: draw its noise all the same, so
            for corruption in corruptions:  # every rank's generator stays in step
                _corrupt(model, f, corruption, n_samples, noise_scale, std, pool, n_repl, gen)
            continue
        patches = _build_patches(model, f, kinds, window, single_kinds, positions)
        str_tokens = [_token_str(model, t) for t in f.tokens]
        rows = per_fact[i] = []
        for corruption in corruptions:
            inputs = _corrupt(model, f, corruption, n_samples, noise_scale, std, pool, n_repl, gen)
            if inputs is None:
                continue
            corrupted, noise = inputs
            p_clean, p_corr, restored = _trace_one(model, f, corrupted, noise, patches, max_rows,
                                                   merge_positions)
            for j, p in enumerate(patches):
                rows.append({"fact": f.name, "corruption": corruption, "kind": p.kind,
                             "window": (1 if p.kind == "resid" or p.kind.endswith("_single")
                                        else window),
                             "layer": p.layer, "position": p.pos, "token": str_tokens[p.pos],
                             "role": _position_role(p.pos, f.subject_span, len(f.tokens)),
                             "clean_prob": p_clean, "corrupt_prob": p_corr,
                             "restored_prob": restored[j],
                             "indirect_effect": restored[j] - p_corr,
                             "n_samples": int(corrupted.shape[0])})
    ordered = distributed.gather_in_order(per_fact, len(facts))  # the ranks' facts, in order
    return pd.DataFrame([row for rows in ordered for row in rows])


def average_trace(trace: pd.DataFrame) -> pd.DataFrame:
    """Average indirect effect per (corruption, kind, role, layer): positions of one role are
    averaged within a fact first, then over facts (Meng et al. Fig. 2 style). Column ``aie``;
    ``n_facts`` facts had a position of that role."""
    if trace.empty:
        return pd.DataFrame(columns=["corruption", "kind", "role", "layer", "aie", "n_facts"])
    per_fact = trace.groupby(["corruption", "kind", "role", "layer", "fact"],
                             sort=False)["indirect_effect"].mean()
    out = (per_fact.groupby(["corruption", "kind", "role", "layer"])
           .agg(aie="mean", n_facts="count").reset_index())
    out["role"] = pd.Categorical(out["role"], categories=list(POSITION_ROLES), ordered=True)
    return out.sort_values(["corruption", "kind", "role", "layer"]).reset_index(drop=True)
