"""Head and expert importance from gradients of gates (Michel, Levy and Neubig 2019, *Are
Sixteen Heads Really Better than One?*, NeurIPS, eq. 2).

Gates ``xi_h`` multiply each head's output; the importance is ``I_h = E_x |dL(x)/dxi_h|``
with the absolute value inside the expectation, per sequence. The absolute value of the batch
mean, ``|E_x dL/dxi_h|``, is a different and much weaker quantity (gradients of opposite sign
on different sequences cancel; measured on SmolLM2 it barely correlates with single-head
ablation): it is reported as ``abs_mean_gradient``, beside the signed first-order estimate of
the loss change when the unit is removed, ``predicted_delta = -E_x dL/dxi_h``. Experts get
the same with a gate on their routed weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pandas as pd
import torch
import torch.nn.functional as F

from analyses import distributed
from analyses.masking.data import LossBatch, _ce_per_seq, _frozen, layer_of
from analyses.masking.removal import moe_layers
from interp import HookedTransformer
from interp.progress import Progress, no_progress

__all__ = ["expert_importance", "head_importance"]


def _importance_frame(keys: dict[str, list], per_seq_abs: torch.Tensor, signed: torch.Tensor,
                      n: int, normalize: bool) -> pd.DataFrame:
    imp = per_seq_abs / n  # E_x |dL(x)/dxi|   [layer, unit]
    mean_grad = signed / n  # E_x dL(x)/dxi
    raw = imp.clone()
    if normalize:  # Michel et al. 2019 sec. 4.1: l2-normalise importance within each layer
        imp = imp / imp.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    df = pd.DataFrame(keys)
    df["importance"] = imp.flatten().numpy()
    df["importance_raw"] = raw.flatten().numpy()
    df["predicted_delta"] = (-mean_grad).flatten().numpy()
    df["abs_mean_gradient"] = mean_grad.abs().flatten().numpy()
    return df


def _mine(lbs: Sequence[LossBatch]) -> list[LossBatch]:
    """This rank's round-robin share of the batches (all of them outside a distributed run):
    the importances are sums over sequences and a count, added over the ranks afterwards
    (:mod:`analyses.distributed`), so the ratios are the one-process ones."""
    return [lb for i, lb in enumerate(lbs) if distributed.mine(i)]


def head_importance(model: HookedTransformer, lbs: Sequence[LossBatch], *,
                    normalize: bool = False, progress: Progress | None = None,
                    return_gate_grad: bool = False) -> pd.DataFrame | tuple:
    """Michel et al. (2019) head importance from gradients of head gates.

    Gates ``xi`` [n_layers, n_heads] of ones, requiring grad, go on every head's output through
    ``model.set_head_gates``; a second, per-sequence gate of ones on ``hook_z`` gives each
    sequence's own gradient ``dL(x)/dxi_h`` from the same backward pass (sequences do not
    interact, and ``L`` is the sum of per-sequence mean losses). Columns: ``layer, head,
    importance`` (``E_x |dL(x)/dxi_h|``, per-layer l2-normalised when ``normalize``),
    ``importance_raw`` (never normalised), ``predicted_delta`` (``-E_x dL/dxi_h``, the
    first-order loss change if the head is removed), ``abs_mean_gradient`` (``|E_x dL/dxi_h|``,
    the weaker batch-mean form, for comparison).

    With ``return_gate_grad`` also returns ``model.set_head_gates``' accumulated gate gradient
    (the sum over sequences), which equals the sum of the per-sequence gradients. In a
    distributed run each rank differentiates its share of the batches and every sum (and the
    gate gradient) is added over the ranks.
    """
    progress = progress or no_progress
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    dev = model.device
    gates = torch.ones(L, H, device=dev, requires_grad=True)
    abs_sum = torch.zeros(L, H, dtype=torch.float64)
    sgn_sum = torch.zeros(L, H, dtype=torch.float64)
    n_seq = 0
    per_seq: dict[int, torch.Tensor] = {}  # layer -> this batch's per-sequence gates [batch, head]

    def gate_z(z: torch.Tensor, hook: object) -> torch.Tensor:
        return z * per_seq[layer_of(hook.name)].to(z.dtype)[:, None, :, None]

    with _frozen(model):
        model.set_head_gates(gates)
        try:
            for lb in progress(_mine(lbs), desc="head importance"):
                B = lb.inputs.shape[0]
                per_seq.update({layer: torch.ones(B, H, device=dev, requires_grad=True)
                                for layer in range(L)})
                with model.hooks(fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), gate_z)]):
                    logits = model(lb.inputs)
                s, n = _ce_per_seq(logits, lb.labels)
                (s / n.clamp(min=1)).sum().backward()
                # [batch, layer, head]
                g = torch.stack([per_seq[layer].grad for layer in range(L)], 1).double().cpu()
                abs_sum += g.abs().sum(0)
                sgn_sum += g.sum(0)
                n_seq += B
        finally:
            model.set_head_gates(None)
    grad = gates.grad.detach().cpu() if gates.grad is not None else torch.zeros(L, H)
    sums = SimpleNamespace(abs_sum=abs_sum, sgn_sum=sgn_sum, n_seq=n_seq, grad=grad)
    distributed.reduce_sums(sums, ["abs_sum", "sgn_sum", "n_seq", "grad"])
    keys = {"layer": [layer for layer in range(L) for _ in range(H)],
            "head": [h for _ in range(L) for h in range(H)]}
    df = _importance_frame(keys, abs_sum, sgn_sum, sums.n_seq, normalize)
    if return_gate_grad:
        return df, sums.grad
    return df


def expert_importance(model: HookedTransformer, lbs: Sequence[LossBatch], *,
                      normalize: bool = False, progress: Progress | None = None) -> pd.DataFrame:
    """Michel-style importance of each expert, ``E_x |dL(x)/dxi_e|`` where ``xi_e`` scales the
    router weight of every token routed to expert ``e`` (a gate on its contribution). Per-slot
    gates of ones on ``hook_expert_weights`` give per-sequence gradients in one backward pass.
    Columns: ``layer, expert, importance, importance_raw, predicted_delta, abs_mean_gradient,
    load`` (fraction of routed slots that went to the expert)."""
    progress = progress or no_progress
    layers = moe_layers(model)
    E = model.cfg.n_experts
    abs_sum = torch.zeros(len(layers), E, dtype=torch.float64)
    sgn_sum = torch.zeros(len(layers), E, dtype=torch.float64)
    load = torch.zeros(len(layers), E, dtype=torch.float64)
    n_seq = 0
    slot_gates: dict[int, torch.Tensor] = {}  # layer -> per-slot gates of the current batch
    idx: dict[int, torch.Tensor] = {}  # layer -> expert index of each slot [batch, pos, top_k]

    def gate_w(w: torch.Tensor, hook: object) -> torch.Tensor:
        g = torch.ones_like(w, requires_grad=True)
        slot_gates[layer_of(hook.name)] = g
        return w * g

    def keep_idx(i: torch.Tensor, hook: object) -> None:
        idx[layer_of(hook.name)] = i.detach()

    hooks = []
    for layer in layers:
        hooks += [(f"blocks.{layer}.mlp.hook_expert_weights", gate_w),
                  (f"blocks.{layer}.mlp.hook_expert_indices", keep_idx)]
    with _frozen(model):
        for lb in progress(_mine(lbs), desc="expert importance"):
            with model.hooks(fwd_hooks=hooks):
                logits = model(lb.inputs)
            s, n = _ce_per_seq(logits, lb.labels)
            (s / n.clamp(min=1)).sum().backward()
            for j, layer in enumerate(layers):
                onehot = F.one_hot(idx[layer], E).double()  # [batch, pos, k, expert]
                grad = slot_gates[layer].grad.double()
                g = torch.einsum("bpk,bpke->be", grad, onehot).cpu()
                abs_sum[j] += g.abs().sum(0)
                sgn_sum[j] += g.sum(0)
                load[j] += onehot.sum((0, 1, 2)).cpu()
            n_seq += lb.inputs.shape[0]
    sums = SimpleNamespace(abs_sum=abs_sum, sgn_sum=sgn_sum, load=load, n_seq=n_seq)
    distributed.reduce_sums(sums, ["abs_sum", "sgn_sum", "load", "n_seq"])
    keys = {"layer": [layer for layer in layers for _ in range(E)],
            "expert": [e for _ in layers for e in range(E)]}
    df = _importance_frame(keys, abs_sum, sgn_sum, sums.n_seq, normalize)
    df["load"] = (load / load.sum(-1, keepdim=True).clamp(min=1)).flatten().numpy()
    return df
