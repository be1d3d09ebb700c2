"""What masking runs on: text cut into fixed-length token batches, BERT-style token masking,
labels, and the cross-entropy every masking measurement uses.

Decoders are scored on the next token; encoders with an LM head on the original tokens at
the positions BERT's masked-LM objective hides (Devlin et al. 2019: 15% replaced by [MASK]).
Text -> ids goes through :mod:`interp.tokenize` (BOS, [CLS]/[SEP] and the bytes fallback for a
model without a tokenizer decided in one place).
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp import HookedTransformer, tokenize
from interp.errors import InterpError

__all__ = ["LossBatch", "has_loss", "layer_of", "load_sample_text", "loss_batches", "mean_loss",
           "replacement_token", "text_to_batches"]


def load_sample_text() -> str:
    """The packaged English sample (40 sentences written for this project, no licence terms)."""
    sample = importlib.resources.files("analyses").joinpath("data/sample_text.txt")
    return sample.read_text(encoding="utf-8")


def text_to_batches(model: HookedTransformer, text: str, *, seq_len: int = 64, n_seqs: int = 8,
                    batch_size: int = 8) -> list[torch.Tensor]:
    """Cut ``text`` into at most ``n_seqs`` sequences of ``seq_len`` tokens, in batches.

    Decoders get their BOS token first when they use one, encoders their [CLS] ... [SEP]
    (:func:`interp.tokenize.frame`, on every sequence). A model without a tokenizer reads the
    UTF-8 bytes as token ids (it needs d_vocab >= 256).
    """
    if not isinstance(text, str) or not text.strip():
        raise InterpError("The masking text is empty; pass a file with some sentences "
                          "(--text FILE).")
    for nm, v in (("seq_len", seq_len), ("n_seqs", n_seqs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise InterpError(f"{nm} must be a positive integer, got {v!r}.")
    cfg = model.cfg
    if cfg.positional == "learned" and seq_len > cfg.n_ctx:
        raise InterpError(f"seq_len {seq_len} exceeds this model's n_ctx={cfg.n_ctx}; use a "
                          "shorter --seq-len.")
    ids = tokenize.encode(model, text, specials=False)
    head, tail = tokenize.frame(model)
    rows = tokenize.windows(ids, seq_len, head, tail)[:n_seqs]
    seqs = torch.tensor(rows, dtype=torch.long, device=model.device)
    return [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]


def replacement_token(model: HookedTransformer) -> tuple[int, str]:
    """The token BERT-style masking writes: [MASK] when the tokenizer has one, else its unknown
    token, else its end-of-text token, else id 0 (a model without a tokenizer)."""
    tok = model.tokenizer
    for attr, what in (("mask_token_id", "mask"), ("unk_token_id", "unknown"),
                       ("eos_token_id", "end-of-text")):
        tid = getattr(tok, attr, None) if tok is not None else None
        if isinstance(tid, int) and 0 <= tid < model.cfg.d_vocab:
            convert = getattr(tok, "convert_ids_to_tokens", None)
            text = convert(tid) if convert is not None else str(tid)
            return tid, f"{what} token {text!r} (id {tid})"
    return 0, "token id 0 (the model has no tokenizer)"


def _special_ids(model: HookedTransformer) -> set[int]:
    tok = model.tokenizer
    return set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()


def _token_mask(model: HookedTransformer, tokens: torch.Tensor, rate: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked tokens, bool [batch, pos] of replaced positions). Special tokens are never
    replaced; each sequence gets ``round(rate * eligible)`` replacements (at least one)."""
    rid, _ = replacement_token(model)
    special = _special_ids(model)
    eligible = torch.ones_like(tokens, dtype=torch.bool)
    for s in special:
        eligible &= tokens != s
    chosen = torch.zeros_like(eligible)
    for b in range(tokens.shape[0]):
        idx = eligible[b].nonzero().flatten()
        if len(idx) == 0:
            continue
        n = max(1, round(rate * len(idx)))
        pick = idx[torch.randperm(len(idx), generator=generator)[:n].to(idx.device)]
        chosen[b, pick] = True
    return tokens.masked_fill(chosen, rid), chosen


def has_loss(model: HookedTransformer) -> bool:
    """True when the model has an LM head (decoders: next token; encoders: masked LM)."""
    return bool(model.cfg.has_unembed) and model.cfg.architecture in ("decoder", "encoder")


def _strategy_labels(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor | None:
    """Labels aligned with the logits for the strategy comparison: the next token for decoders
    (last position ignored), the original token at every position for encoders with an LM
    head (so token masking is scored on what was hidden), None without an LM head."""
    if not has_loss(model):
        return None
    if model.cfg.architecture == "decoder":
        labels = torch.full_like(tokens, -100)
        labels[:, :-1] = tokens[:, 1:]
        return labels
    return tokens.clone()


def _ce_per_seq(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy [batch], labelled token count [batch]) in float32+."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                         reduction="none")  # [batch, pos]
    return ce.sum(1), (labels != -100).sum(1)


@dataclass
class LossBatch:
    """Inputs and aligned labels (-100 ignored) of one batch for head and expert masking."""

    inputs: torch.Tensor  # [batch, pos]
    labels: torch.Tensor  # [batch, pos]


def loss_batches(model: HookedTransformer, batches: Iterable[torch.Tensor], *, seed: int = 0,
                 mlm_rate: float = 0.15) -> list[LossBatch]:
    """Attach labels: next token for decoders; for encoders with an LM head, BERT's masked-LM
    objective (``mlm_rate`` of tokens replaced by [MASK], labels only there, seeded)."""
    if not has_loss(model):
        raise InterpError("This model has no LM head, so there is no loss to attribute to heads "
                          "or experts; head masking needs a decoder or an encoder with an MLM "
                          "head.")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for tokens in batches:
        tokens = tokens.to(model.device)
        if model.cfg.architecture == "decoder":
            out.append(LossBatch(tokens, _strategy_labels(model, tokens)))
        else:
            masked, chosen = _token_mask(model, tokens, mlm_rate, gen)
            out.append(LossBatch(masked, tokens.masked_fill(~chosen, -100)))
    if not out:
        raise InterpError("No batches to measure a loss on; pass some text.")
    return out


@torch.no_grad()
def mean_loss(model: HookedTransformer, lbs: Sequence[LossBatch]) -> float:
    """Token-mean cross-entropy over all batches (streamed)."""
    total, count = 0.0, 0
    for lb in lbs:
        s, n = _ce_per_seq(model(lb.inputs), lb.labels)
        total += float(s.double().sum())
        count += int(n.sum())
    return total / max(count, 1)


@contextlib.contextmanager
def _frozen(model: HookedTransformer) -> Iterator[None]:
    """Parameters stop requiring grad (only the gates do), then are restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def layer_of(name: str) -> int:
    """The layer index in a hook name such as ``blocks.3.attn.hook_z``."""
    return int(name.split(".")[1])
