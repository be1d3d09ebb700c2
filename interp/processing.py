"""Weight processing as TransformerLens defines it: the same function, cleaner weights.

Five rewrites of a loaded model's weights, each leaving what the model computes unchanged
(TransformerLens' ``HookedTransformer.from_pretrained`` applies the first four by default;
Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", for why they help):

- ``fold_ln``: a pre-norm's weight (and LayerNorm's bias) moves into the weights that read
  its output (q/k/v, the MLP's input and gate, the MoE router and experts, the unembedding);
  for LayerNorm those reading weights are also centred along d_model, since the norm's output
  has mean zero. The norm becomes TransformerLens' ``LNPre`` / ``RMSPre`` (it only centres
  and divides by its scale), and ``cfg.normalization_type`` says so.
- ``center_writing_weights``: every weight that writes to the residual stream (W_E, W_pos,
  W_O, b_O, W_out, b_out) is centred along d_model; valid only where every reader of the
  stream is a LayerNorm (which removes the mean anyway). RMSNorm models: does not apply.
- ``center_unembed``: W_U and b_U centred over the vocabulary. Each position's logits shift
  by one constant: log-probabilities, probabilities and logit differences are unchanged.
- ``fold_value_biases``: b_V moves into b_O (each head's pattern sums to 1, so b_V @ W_O
  reaches the output unchanged). Valid for every attention; GQA sums each query head's share.
- ``refactor_factored_attn_matrices`` (off by default, as TL): per head, W_Q W_K^T and W_V W_O
  are re-factored by SVD (W_O becomes a rotation, W_Q and W_K share singular values). Not for
  RoPE (the QK product then depends on position), q/k norms or GQA (heads share keys).

What applies where: pre-norm decoders (GPT-2, Llama, SmolLM2) take all of them (RMSNorm: no
centring of writing weights). Post-norm encoders (BERT, MiniLM): a norm's output *is* the
residual stream, so its weight cannot move into a reader; ``fold_ln`` does not apply, and
``center_writing_weights`` does not either (TL defines it for pre-norm streams); value-bias
folding and refactoring do. Applied steps are recorded in ``cfg.extra["weight_processing"]``
(``cfg.weight_processing``), and a processed model saves and reloads as processed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interp.errors import InterpError
from interp.tl_weights import replace_config

#: TransformerLens' defaults for HookedTransformer.from_pretrained
TL_DEFAULTS = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
               "fold_value_biases": True, "refactor_factored_attn_matrices": False}
STEPS = tuple(TL_DEFAULTS)


@torch.no_grad()
def process_weights(model: Any, *, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False) -> Any:
    """Apply TransformerLens' weight processing to ``model`` in place and return it.

    Each step that does not apply to the architecture (see the module docstring) is skipped
    and recorded as not applied; ``refactor_factored_attn_matrices=True`` on a model it cannot
    refactor raises. Logits are unchanged (``center_unembed``: up to one constant per
    position)."""
    from interp.model import HookedTransformer

    if not isinstance(model, HookedTransformer):
        raise InterpError(f"Weight processing needs an interp.HookedTransformer, got "
                          f"{type(model).__name__} (encoder-decoder models are not processed).")
    cfg = model.cfg
    done = dict(cfg.weight_processing)
    changes: dict[str, Any] = {}
    if fold_ln and not done.get("fold_ln") and _can_fold_ln(model):
        _fold_ln(model, changes)
        done["fold_ln"] = True
    if center_writing_weights and not done.get("center_writing_weights") and _can_center(model):
        _center_writing(model, changes)
        done["center_writing_weights"] = True
    if center_unembed and not done.get("center_unembed") and hasattr(model, "unembed"):
        _center_unembed(model, changes)
        done["center_unembed"] = True
    if fold_value_biases and not done.get("fold_value_biases"):
        _fold_value_biases(model, changes)
        done["fold_value_biases"] = True
    if refactor_factored_attn_matrices:
        _check_refactor(model)
        _fold_value_biases(model, changes)
        done["fold_value_biases"] = True
        for block in model.blocks:
            _refactor_qk(block.attn)
            _refactor_ov(block.attn)
        done["refactor_factored_attn_matrices"] = True
    for step in STEPS:
        done.setdefault(step, False)
    replace_config(model, cfg.replace(**changes, extra={**cfg.extra, "weight_processing": done}))
    return model


# ---------------- fold_ln ----------------
def _can_fold_ln(model: Any) -> bool:
    """Pre-norm, no embedding norm, and a final norm that feeds a plain unembedding (or none):
    then every norm's output is read only by linear maps."""
    cfg = model.cfg
    if cfg.norm == "none" or cfg.norm_placement != "pre" or cfg.embed_norm:
        return False
    if hasattr(model, "ln_final") and (not hasattr(model, "unembed") or cfg.mlm_head):
        return False  # the final norm's output is the model's output: nothing reads it linearly
    if cfg.is_moe and cfg.norm == "layernorm" and cfg.norm_bias:
        raise InterpError("fold_ln cannot fold a LayerNorm bias into a bias-free MoE router; "
                          "load with fold_ln=False.")
    return True


def _fold_into(linears: list[nn.Linear], norm: Any, center: bool) -> None:
    """Fold ``norm``'s weight and bias into the Linear layers that read its output, then
    (LayerNorm) centre their weights along d_model, and drop the norm's affine part."""
    w, b = norm.weight_or_none, norm.bias_or_none
    for lin in linears:
        W = lin.weight  # [out, d_model]
        if b is not None:
            _ensure_bias(lin).add_(W @ b.to(W.dtype))
        if w is not None:
            W.mul_(w.to(W.dtype))
        if center:
            W.sub_(W.mean(dim=1, keepdim=True))
    norm.remove_affine()


def _mlp_readers(mlp: nn.Module) -> list[nn.Linear]:
    """Every Linear reading the MLP's input: fc_in, or a MoE's router, experts and shared."""
    if hasattr(mlp, "fc_in"):
        return [mlp.fc_in]
    out = [mlp.router, *(e.fc_in for e in mlp.experts)]
    if hasattr(mlp, "shared"):
        out.append(mlp.shared.fc_in)
    if hasattr(mlp, "shared_gate"):
        out.append(mlp.shared_gate)
    return out


def _fold_ln(model: Any, changes: dict[str, Any]) -> None:
    cfg = model.cfg
    center = cfg.norm == "layernorm"
    has_bias = center and cfg.norm_bias
    for block in model.blocks:
        _fold_into([block.attn.qkv], block.ln1, center)
        if hasattr(block, "ln2"):
            _fold_into(_mlp_readers(block.mlp), block.ln2, center)
    if has_bias:  # LayerNorm biases now live in q/k/v and the MLP input: keep the config true
        changes.update(attn_qkv_bias=True, mlp_bias=True)
        for module in model.modules():
            if module.__class__.__name__ == "MLP":
                _ensure_bias(module.fc_in), _ensure_bias(module.fc_out)
    if hasattr(model, "ln_final"):
        _untie(model, changes)
        ln, unembed = model.ln_final, model.unembed
        W = unembed.weight  # [d_vocab, d_model]
        if ln.bias_or_none is not None:
            unembed_bias(model, changes).add_(W @ ln.bias_or_none.to(W.dtype))
        _fold_into([_AsLinear(W)], ln, center)


class _AsLinear:
    """The unembedding's weight seen as a Linear without bias (for :func:`_fold_into`)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.bias = weight, None


def _ensure_bias(lin: Any) -> torch.Tensor:
    """The Linear's bias, created as zeros where it has none."""
    if lin.bias is None:
        W = lin.weight
        lin.bias = nn.Parameter(torch.zeros(W.shape[0], device=W.device, dtype=W.dtype))
    return lin.bias


def _untie(model: Any, changes: dict[str, Any]) -> None:
    if model.cfg.tie_embeddings:
        model.unembed.untie()
        changes["tie_embeddings"] = False


def unembed_bias(model: Any, changes: dict[str, Any]) -> torch.Tensor:
    """The unembedding's real bias parameter, created (zeros) where it had none."""
    if not model.unembed.has_bias:
        model.unembed.set_bias(torch.zeros_like(model.unembed.b_U))
        changes["unembed_bias"] = True
    return model.unembed.b_U


# ---------------- centring ----------------
def _can_center(model: Any) -> bool:
    """Every reader of the residual stream is a LayerNorm: pre-norm LayerNorm with a final
    norm before any output."""
    cfg = model.cfg
    return (cfg.norm == "layernorm" and cfg.norm_placement == "pre" and not cfg.embed_norm
            and hasattr(model, "ln_final"))


def _center_writing(model: Any, changes: dict[str, Any]) -> None:
    if hasattr(model, "unembed"):
        _untie(model, changes)  # W_E changes below; W_U must not
    writers: list[torch.Tensor] = [model.embed.W_E]
    if hasattr(model, "pos_embed") and model.pos_embed.learned:
        writers.append(model.pos_embed.W_pos)
    if hasattr(model, "token_type_embed"):
        writers.append(model.token_type_embed.W_E)
    for t in writers:  # [rows, d_model]
        t.sub_(t.mean(dim=-1, keepdim=True))
    for module in model.modules():
        lin = getattr(module, "o", None) if hasattr(module, "qkv") else getattr(module, "fc_out",
                                                                                  None)
        if isinstance(lin, nn.Linear):  # [d_model, in]: centre each column over d_model
            lin.weight.sub_(lin.weight.mean(dim=0, keepdim=True))
            if lin.bias is not None:
                lin.bias.sub_(lin.bias.mean())


def _center_unembed(model: Any, changes: dict[str, Any]) -> None:
    _untie(model, changes)
    W = model.unembed.weight  # [d_vocab, d_model]
    W.sub_(W.mean(dim=0, keepdim=True))
    if model.unembed.has_bias:
        b = model.unembed.b_U
        b.sub_(b.mean())


# ---------------- value biases ----------------
def _fold_value_biases(model: Any, changes: dict[str, Any]) -> None:
    """b_O += sum over query heads of b_V[kv(h)] @ W_O[h]; b_V = 0."""
    cfg = model.cfg
    if not cfg.attn_qkv_bias:
        return
    group = cfg.n_heads // cfg.n_kv_heads
    for block in model.blocks:
        attn = block.attn
        b_V = attn.b_V.repeat_interleave(group, dim=0)  # [head, d_head]
        shift = torch.einsum("hd,hdm->m", b_V, attn.W_O)
        if attn.o.bias is None:
            changes["attn_out_bias"] = True
        _ensure_bias(attn.o).add_(shift)
        attn.b_V.zero_()  # a view of the fused bias
    if changes.get("attn_out_bias"):
        for block in model.blocks:
            _ensure_bias(block.attn.o)


# ---------------- refactoring ----------------
def _check_refactor(model: Any) -> None:
    cfg = model.cfg
    why = ("RoPE makes W_Q W_K^T depend on position" if cfg.positional == "rope"
           else "q/k norms act between W_Q and W_K" if cfg.qk_norm != "none"
           else "grouped-query heads share keys and values" if cfg.n_kv_heads != cfg.n_heads
           else None)
    if why:
        raise InterpError(f"refactor_factored_attn_matrices does not apply to this model: {why}; "
                          "load with refactor_factored_attn_matrices=False.")


def _low_rank_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SVD of A @ B^T (A, B [n, r]) in O(n r^2): U [n, r], S [r], V [n, r]."""
    qa, ra = torch.linalg.qr(A.double())
    qb, rb = torch.linalg.qr(B.double())
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, qb @ vh.T


def _refactor_qk(attn: Any) -> None:
    """W_Q' = U sqrt(S), W_K' = V sqrt(S) of the bias-augmented [d_model + 1] bilinear form."""
    W_Q, W_K, b_Q, b_K = attn.W_Q, attn.W_K, attn.b_Q, attn.b_K  # [head, d_model, d_head]
    has_bias = attn.qkv.bias is not None
    for h in range(attn.n_heads):
        A, B = W_Q[h], W_K[h]
        if has_bias:
            A, B = torch.cat([A, b_Q[h][None]]), torch.cat([B, b_K[h][None]])
        U, S, V = _low_rank_svd(A, B)
        root = S.sqrt()
        newA, newB = (U * root).to(A.dtype), (V * root).to(B.dtype)
        W_Q[h].copy_(newA[: W_Q.shape[1]])
        W_K[h].copy_(newB[: W_K.shape[1]])
        if has_bias:
            b_Q[h].copy_(newA[-1])
            b_K[h].copy_(newB[-1])


def _refactor_ov(attn: Any) -> None:
    """W_V' = U S, W_O' = V^T of W_V W_O (value biases are folded first)."""
    W_V, W_O = attn.W_V, attn.W_O  # [head, d_model, d_head], [head, d_head, d_model]
    for h in range(attn.n_heads):
        U, S, V = _low_rank_svd(W_V[h], W_O[h].T)
        W_V[h].copy_((U * S).to(W_V.dtype))
        W_O[h].copy_(V.T.to(W_O.dtype))
