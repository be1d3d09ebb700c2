"""What every FFN knowledge method reads from the model: the checks, next-token probabilities.

Each method measures the probability of an answer's first token at a prompt's last position, so
they share one way to check a model (a decoder with an unembedding and dense FFNs), to turn a
final residual into logits as the model's own forward does, to run padded prompts and read their
last positions, and to copy a slice of a KV cache (causal tracing and integrated gradients
recompute only the last positions, reading earlier ones from the cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from interp import HookedTransformer, KVCache, tokenize
from interp.errors import InterpError

#: A forward hook as ``model.hooks`` takes it: (hook name, function of (activation, hook)).
FwdHook = tuple[str, Callable[..., torch.Tensor | None]]


def check_model(model: object, *, need_tokenizer: bool = False) -> None:
    """Raise :class:`InterpError` unless ``model`` is a decoder with an unembedding and at
    least one dense FFN layer (every method here reads next-token probabilities)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise InterpError("FFN knowledge analyses need an interp.HookedTransformer.")
    if not cfg.has_unembed or not hasattr(model, "unembed"):
        raise InterpError("This model has no unembedding (a bare encoder such as minilm); FFN "
                          "knowledge analyses need a language model with a vocabulary head, e.g. "
                          "smollm2-135m.")
    if cfg.architecture != "decoder":
        raise InterpError("FFN knowledge analyses need a decoder (causal language model), not a "
                          f"{cfg.architecture} model.")
    if not dense_layers(model):
        raise InterpError("This model has no dense FFN layer (attention-only or all "
                          "mixture-of-experts); nothing to analyse.")
    if need_tokenizer and getattr(model, "tokenizer", None) is None:
        raise InterpError("Text facts need the model's tokenizer; load the model with "
                          "interp.load_pretrained.")


def dense_layers(model: HookedTransformer) -> list[int]:
    """Layers whose FFN is dense (has ``mlp.hook_post``)."""
    return [i for i, b in enumerate(model.blocks)
            if hasattr(getattr(b, "mlp", None), "hook_post")]


def _unembed(model: HookedTransformer, x: torch.Tensor) -> torch.Tensor:
    """Final (already normed) residual -> logits, as the model's own forward does it."""
    if model.cfg.logit_scale != 1.0:
        x = x * model.cfg.logit_scale
    if hasattr(model, "mlm_head"):
        x = model.mlm_head(x)
    return model.unembed(x).float()


def _final_norm(model: HookedTransformer, x: torch.Tensor) -> torch.Tensor:
    return model.ln_final(x) if hasattr(model, "ln_final") else x


def _pad(seqs: Sequence[Sequence[int]], pad: int,
         device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [batch, pos], attention mask and the last real position per row
    (:func:`interp.tokenize.pad_batch`, on ``device``)."""
    batch = tokenize.pad_batch(seqs, pad_id=pad).to(device)
    return batch.tokens, batch.attention_mask, batch.lengths - 1


def _token_str(model: HookedTransformer, token_id: int) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return str(int(token_id))
    return tok.decode([int(token_id)])


@torch.no_grad()
def _last_probs(model: HookedTransformer, seqs: Sequence[Sequence[int]],
                fwd_hooks: list[FwdHook] | None = None,
                batch_size: int = 32) -> torch.Tensor:
    """Next-token distributions at each sequence's last position [n, d_vocab] (float)."""
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        tokens, mask, last = _pad(chunk, tokenize.pad_id(model), model.device)
        with model.hooks(fwd_hooks=fwd_hooks or []):
            hidden = model(tokens, attention_mask=mask, return_type="hidden")
        out.append(torch.softmax(_unembed(model, hidden[torch.arange(len(chunk)), last]), -1))
    return torch.cat(out)


def _kv_rows(cache: KVCache, rows: torch.Tensor, upto: int) -> KVCache | None:
    """A fresh KV cache holding rows ``rows`` of ``cache``'s first ``upto`` positions."""
    if upto == 0:
        return None
    new = KVCache(len(cache.layers))
    for src, dst in zip(cache.layers, new.layers, strict=True):
        dst.k, dst.v = src.k[rows, :upto], src.v[rows, :upto]
    return new
