"""Path patching (Wang et al. (2022), *Interpretability in the Wild*, arXiv:2211.00593, sec. 3.1
and appendix B): the effect of a sender head on the metric *only through* chosen receivers.

Wang et al. run the base prompt with the sender's output taken from the other prompt and
every other head frozen at its base value, record the receivers' inputs, and run the base
prompt again with those inputs patched in. With the other components frozen, a receiver's
input is the base residual stream plus the sender's output change, so we add that change
directly to the receiver's own copy of the residual stream (``hook_q_input`` /
``hook_k_input`` / ``hook_v_input`` of one head, behind ``set_use_split_qkv_input``; the
receiver ``logits`` is the final residual stream read by the unembedding): one forward per
sender, many senders per forward (stacked along the batch dimension).

Direction: the base run is the corrupted prompt and the sender's output comes from the clean
one, so the score is normalised like activation patching (1 = the clean metric restored).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import torch

from analyses.circuits.attribution import use_flags
from analyses.circuits.metrics import Metric, get_metric, normalise
from analyses.circuits.pairs import PromptPairs
from analyses.circuits.patching import Baseline, my_batches
from interp.errors import InterpError
from interp.progress import Progress, no_progress

__all__ = ["parse_receiver", "path_patching"]

_RECEIVER = re.compile(r"^L(\d+)H(\d+)\.([qkv])$")


def parse_receiver(model, text: str) -> tuple[str, int | None, int]:
    """``"L1H2.k"`` -> (hook name, head, layer); ``"logits"`` -> the final residual stream."""
    L = model.cfg.n_layers
    if text == "logits":
        return f"blocks.{L - 1}.hook_resid_post", None, L
    found = _RECEIVER.match(text)
    if not found:
        raise InterpError(f"Receiver {text!r} is not 'L<layer>H<head>.<q|k|v>' (e.g. 'L1H0.k') "
                          "or 'logits'.")
    layer, head, x = int(found.group(1)), int(found.group(2)), found.group(3)
    n = model.cfg.n_heads if x == "q" else (model.cfg.n_kv_heads or model.cfg.n_heads)
    if layer >= L or head >= n:
        raise InterpError(f"Receiver {text!r} does not exist: the model has {L} layers and "
                          f"{n} {x} heads per layer.")
    return f"blocks.{layer}.hook_{x}_input", head, layer


def _group_hooks(parsed: list[tuple[str, int | None, int]], P: int, B: int,
                 delta: torch.Tensor) -> list:
    """One forward hook per receiver hook name adding sender p's output change to copy p."""
    heads_by_hook: dict[str, list[int | None]] = {}
    for hook, head, _ in parsed:
        heads_by_hook.setdefault(hook, []).append(head)

    def make(heads: list[int | None]):
        def add(x: torch.Tensor, hook) -> torch.Tensor:
            x = x.clone()
            v = x.view(P, B, *x.shape[1:])
            d = delta.to(x.dtype)  # [P, B, pos, d_model]
            for h in heads:
                if h is None:
                    v += d
                else:
                    v[:, :, :, h] += d
            return x
        return add

    return [(hook, make(heads)) for hook, heads in heads_by_hook.items()]


def _rep(t: torch.Tensor, P: int) -> torch.Tensor:
    """``t`` stacked P times along the batch dimension, as the patched copies are."""
    return t.repeat(P, *([1] * (t.ndim - 1)))


# Long because it validates, streams batches, stacks senders and builds the table in one pass.
@torch.no_grad()
def path_patching(model, pairs: PromptPairs, receivers: Sequence[str], *,
                  senders: Sequence[tuple[int, int]] | None = None,
                  metric: str | Metric = "logit_diff", batch_size: int = 8, max_batch: int = 128,
                  progress: Progress = no_progress) -> pd.DataFrame:
    """The effect of each sender head (``(layer, head)``; default: every head before the first
    receiver's layer) through ``receivers`` only (``"L1H0.k"``, ``"L1H2.q"``, ``"logits"``).

    Columns ``layer``, ``head`` (the sender), ``metric`` (mean patched metric) and ``score``
    (0 = corrupted, 1 = clean); ``df.attrs`` has ``clean``, ``corrupted`` and ``receivers``.
    In a distributed run each rank takes its share of the pair batches and the per-sender
    sums are all-reduced.
    """
    fn = get_metric(metric)
    if not receivers:
        raise InterpError("Give at least one receiver, e.g. receivers=['L1H0.k'].")
    parsed = [parse_receiver(model, r) for r in receivers]
    first = min(layer for _, _, layer in parsed)
    if senders is None:
        senders = [(layer, h) for layer in range(first) for h in range(model.cfg.n_heads)]
    for layer, h in senders:
        if not (0 <= layer < first and 0 <= h < model.cfg.n_heads):
            raise InterpError(f"Sender L{layer}H{h} must be a head in a layer before the first "
                              f"receiver's layer {first}; choose senders in layers 0..{first - 1}.")
    names = sorted({f"blocks.{layer}.attn.hook_result" for layer, _ in senders})
    base = Baseline(torch.zeros(len(senders), dtype=torch.float64, device=model.device))
    batches = [b for _, b in my_batches(pairs, batch_size)]
    with use_flags(model, attn_result=True, split_qkv_input=True):
        for b in progress(batches, desc="path patching", total=len(batches)):
            b = b.to(model.device)
            clean_logits, clean = model.run_with_cache(b.clean, names_filter=names)
            corr_logits, corr = model.run_with_cache(b.corrupted, names_filter=names)
            cl = clean_logits[:, -1].float()
            base.add(fn(cl, b.answer, b.wrong, cl),
                     fn(corr_logits[:, -1].float(), b.answer, b.wrong, cl))
            B = b.clean.shape[0]
            per = max(1, max_batch // B)
            for s in range(0, len(senders), per):
                group = senders[s:s + per]
                delta = torch.stack([
                    clean[f"blocks.{layer}.attn.hook_result"][:, :, h]
                    - corr[f"blocks.{layer}.attn.hook_result"][:, :, h] for layer, h in group])
                P = len(group)
                logits = model.run_with_hooks(b.corrupted.repeat(P, 1),
                                              fwd_hooks=_group_hooks(parsed, P, B, delta))
                m = fn(logits[:, -1].float(), *(_rep(t, P) for t in (b.answer, b.wrong, cl)))
                base.totals[s:s + P] += m.view(P, B).double().sum(1)
            del clean, corr
    base.reduce()
    m_clean, m_corr = base.means
    df = pd.DataFrame([{"layer": layer, "head": h, "metric": v / base.n,
                        "score": normalise(v / base.n, m_clean, m_corr)}
                       for (layer, h), v in zip(senders, base.totals.tolist(), strict=True)])
    df.attrs.update(clean=m_clean, corrupted=m_corr, receivers=list(receivers), n_pairs=base.n)
    return df
