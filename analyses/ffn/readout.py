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


#: Rows of one unembedding product in :func:`answer_probs`: a 256 x 49,152 float32 buffer is
#: 50 MB, written once per call and reused by every chunk.
_CHUNK = 256


def _plain_unembed(model: HookedTransformer, x: torch.Tensor) -> bool:
    """Whether ``_unembed`` is one product plus bias on float32 CPU tensors (no MLM head, no
    softcap and its hook points), which :func:`answer_probs` may run in place."""
    u = model.unembed
    return (not hasattr(model, "mlm_head") and getattr(u, "softcap", None) is None
            and hasattr(u, "W_U") and x.device.type == "cpu"
            and x.dtype == torch.float32 and u.W_U.dtype == torch.float32)


def answer_probs(model: HookedTransformer, hidden: torch.Tensor, answer: int | torch.Tensor,
                 *, grads: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """P(answer) [rows] of final (already normed) residuals ``hidden`` [rows, d_model], and
    with ``grads`` dP/d(hidden) [rows, d_model]; ``answer`` one token id or one per row.

    Why not ``softmax(_unembed(x))[:, a]``: causal tracing and integrated gradients read the
    answer's probability from ~60,000 and ~40,000 rows of SmolLM2's 49,152-way vocabulary.
    Each fresh [rows, vocabulary] tensor is a new ``mmap`` whose every 4 KB page faults when
    first written (transparent huge pages are opt-in here): 1,024 rows took 261 ms as
    product + softmax, 177 ms as the same product and softmax in one reused buffer (Xeon,
    2 threads). So the logits, their softmax and (``grads``) the softmax's gradient are
    computed in place in one buffer of :data:`_CHUNK` rows. The gradient is the softmax's
    own: dP/dz = P (onehot(a) - softmax(z)), times the unembedding (and ``logit_scale``).
    Models whose unembedding is not one plain product (an MLM head, Gemma 2's softcap with
    its hook points) and tensors off the float32 CPU path take ``_unembed`` and autograd.
    """
    rows, dev = hidden.shape[0], hidden.device
    ids = (torch.full((rows,), int(answer), dtype=torch.long, device=dev)
           if isinstance(answer, int) else answer.to(dev))
    if not _plain_unembed(model, hidden):
        return _answer_probs_autograd(model, hidden, ids, grads)
    with torch.no_grad():
        return _answer_probs_inplace(model, hidden.detach(), ids, grads)


def _answer_probs_inplace(model: HookedTransformer, hidden: torch.Tensor, ids: torch.Tensor,
                          grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`answer_probs` in one reused [chunk, vocabulary] buffer."""
    rows, dev = hidden.shape[0], hidden.device
    u, scale = model.unembed, model.cfg.logit_scale
    W_U = u.W_U.detach()  # [d_model, vocab]
    bias = u.b_U.detach() if u.has_bias else None
    buf = torch.empty(min(rows, _CHUNK), W_U.shape[1], dtype=torch.float32, device=dev)
    probs = torch.empty(rows, dtype=torch.float32, device=dev)
    g = torch.empty(hidden.shape, dtype=torch.float32, device=dev) if grads else None
    for lo in range(0, rows, _CHUNK):
        hi = min(rows, lo + _CHUNK)
        x, out, a = hidden[lo:hi], buf[:hi - lo], ids[lo:hi]
        if scale != 1.0:
            x = x * scale
        if bias is None:
            torch.mm(x, W_U, out=out)
        else:
            torch.addmm(bias, x, W_U, out=out)
        torch.ops.aten._softmax.out(out, -1, False, out=out)
        at = torch.arange(hi - lo, device=dev)
        p = out[at, a].clone()
        probs[lo:hi] = p
        if g is not None:  # dP/dz = -P softmax(z), plus P at the answer; then back through W_U
            out.mul_(-p[:, None])
            out[at, a] += p
            torch.mm(out, W_U.T, out=g[lo:hi])
            if scale != 1.0:
                g[lo:hi] *= scale
    return probs, g


def _answer_probs_autograd(model: HookedTransformer, hidden: torch.Tensor, ids: torch.Tensor,
                           grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`answer_probs` through ``_unembed`` (any unembedding, any device and dtype)."""
    at = torch.arange(hidden.shape[0], device=hidden.device)
    if not grads:
        with torch.no_grad():
            return torch.cat([torch.softmax(_unembed(model, hidden[c:c + _CHUNK]), -1)[
                at[c:c + _CHUNK] - c, ids[c:c + _CHUNK]] for c in range(0, len(at), _CHUNK)]), None
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        p = torch.softmax(_unembed(model, h), -1)[at, ids]
        (g,) = torch.autograd.grad(p.sum(), h)
    return p.detach().float(), g


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
