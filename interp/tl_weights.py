"""TransformerLens' model-level weight names: stacked per-layer weights, factored circuits,
``tl_parameters()``, exact logit directions, and a config that follows ``model.to``.

TL analysis code reads ``model.W_Q`` [n_layers, n_heads, d_model, d_head] and friends,
``model.QK`` / ``model.OV`` as :class:`transformer_lens.FactoredMatrix`, ``model.b_U``, and
(``SVDInterpreter``) a dict of TL-named parameters from ``model.tl_parameters()``. Our weights
live fused (one q/k/v matmul); these are stacked copies built on demand, so the forward pays
nothing for them. Per-block views (``blocks[l].attn.W_Q`` ...) stay views over the storage.

Grouped-query attention: per block, ``attn.W_K`` / ``W_V`` / ``b_K`` / ``b_V`` keep their
``n_kv_heads`` (writable views; analyses index them by ``h // group``). The model-level stacks
are TL's: expanded to ``n_heads`` (each query head with the key/value head it reads), and
``model._W_K`` / ``_W_V`` / ``_b_K`` / ``_b_V`` are the raw ``n_kv_heads`` stacks.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from interp.errors import InterpError


class TLWeights:
    """Mixin for :class:`interp.HookedTransformer`: TransformerLens' weight names."""

    cfg: Any
    blocks: Any

    # ---------------- attention ----------------
    def _attn_stack(self, name: str, expand: bool = False) -> torch.Tensor:
        out = torch.stack([getattr(b.attn, name) for b in self.blocks])
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        return out.repeat_interleave(group, dim=1) if expand and group > 1 else out

    @property
    def W_Q(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        return self._attn_stack("W_Q")

    @property
    def W_K(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        """Keys per query head (GQA expanded, as TL); ``_W_K`` has the kv heads."""
        return self._attn_stack("W_K", expand=True)

    @property
    def W_V(self) -> Float[torch.Tensor, "n_layers n_heads d_model d_head"]:
        return self._attn_stack("W_V", expand=True)

    @property
    def _W_K(self) -> Float[torch.Tensor, "n_layers n_kv_heads d_model d_head"]:
        return self._attn_stack("W_K")

    @property
    def _W_V(self) -> Float[torch.Tensor, "n_layers n_kv_heads d_model d_head"]:
        return self._attn_stack("W_V")

    @property
    def W_O(self) -> Float[torch.Tensor, "n_layers n_heads d_head d_model"]:
        return self._attn_stack("W_O")

    @property
    def b_Q(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._attn_stack("b_Q")

    @property
    def b_K(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._attn_stack("b_K", expand=True)

    @property
    def b_V(self) -> Float[torch.Tensor, "n_layers n_heads d_head"]:
        return self._attn_stack("b_V", expand=True)

    @property
    def _b_K(self) -> Float[torch.Tensor, "n_layers n_kv_heads d_head"]:
        return self._attn_stack("b_K")

    @property
    def _b_V(self) -> Float[torch.Tensor, "n_layers n_kv_heads d_head"]:
        return self._attn_stack("b_V")

    @property
    def b_O(self) -> Float[torch.Tensor, "n_layers d_model"]:
        return self._attn_stack("b_O")

    @property
    def QK(self) -> Any:
        """Each head's W_Q W_K^T [n_layers, n_heads, d_model, d_model], factored (TL's
        ``FactoredMatrix``; RoPE models: the position-free part, as TL)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> Any:
        """Each head's W_V W_O [n_layers, n_heads, d_model, d_model], factored."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    # ---------------- MLP ----------------
    def _mlp_stack(self, name: str) -> torch.Tensor:
        cfg = self.cfg
        if cfg.attn_only:
            raise InterpError(f"model.{name}: this model is attention-only (no MLP weights).")
        if cfg.is_moe:
            raise InterpError(f"model.{name}: MoE layers have one {name} per expert; read "
                              f"model.blocks[l].mlp.experts[e].{name}.")
        if name == "W_gate" and not cfg.is_gated:
            raise InterpError(f"model.W_gate: act={cfg.act!r} is not a gated FFN (no gate).")
        return torch.stack([getattr(b.mlp, name) for b in self.blocks])

    @property
    def W_in(self) -> Float[torch.Tensor, "n_layers d_model d_mlp"]:
        return self._mlp_stack("W_in")

    @property
    def W_gate(self) -> Float[torch.Tensor, "n_layers d_model d_mlp"]:
        return self._mlp_stack("W_gate")

    @property
    def W_out(self) -> Float[torch.Tensor, "n_layers d_mlp d_model"]:
        return self._mlp_stack("W_out")

    @property
    def b_in(self) -> Float[torch.Tensor, "n_layers d_mlp"]:
        return self._mlp_stack("b_in")

    @property
    def b_out(self) -> Float[torch.Tensor, "n_layers d_model"]:
        return self._mlp_stack("b_out")

    # ---------------- embeddings ----------------
    @property
    def W_pos(self) -> Float[torch.Tensor, "n_ctx d_model"]:
        if not hasattr(self, "pos_embed"):
            raise InterpError(f"model.W_pos: positional={self.cfg.positional!r} adds no "
                              "position table to the residual stream.")
        return self.pos_embed.W_pos

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab_out"]:
        """The unembedding bias; zeros where the model has none (as TL)."""
        if not hasattr(self, "unembed"):
            raise InterpError("model.b_U: this model has no unembedding (a bare encoder).")
        return self.unembed.b_U

    def tl_parameters(self) -> dict[str, torch.Tensor]:
        """Every weight under TransformerLens' parameter name (``blocks.0.attn.W_Q``,
        ``blocks.0.mlp.W_in``, ``blocks.0.ln2.w``, ``unembed.W_U``, ...), in TL's shapes.

        TL 4's tools (``SVDInterpreter``) read this instead of ``named_parameters()`` when a
        model has it. Attention and MLP entries are views of our fused weights; norm weights
        appear only while not folded (SVDInterpreter multiplies ``ln2.w`` in when present)."""
        out: dict[str, torch.Tensor] = {"embed.W_E": self.embed.W_E}
        if hasattr(self, "pos_embed"):
            out["pos_embed.W_pos"] = self.pos_embed.W_pos
        for i, block in enumerate(self.blocks):
            group = self.cfg.n_heads // self.cfg.n_kv_heads
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                t = getattr(block.attn, name)
                if group > 1 and name[-1] in "KV":  # TL's GQA: raw _W_K, W_K per query head
                    out[f"blocks.{i}.attn._{name}"] = t
                    t = t.repeat_interleave(group, dim=0)
                out[f"blocks.{i}.attn.{name}"] = t
            mlp = getattr(block, "mlp", None)
            if mlp is not None and hasattr(mlp, "W_in"):
                for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
                    if (t := getattr(mlp, name)) is not None:
                        out[f"blocks.{i}.mlp.{name}"] = t
            for ln in ("ln1", "ln2"):
                out.update(_norm_params(f"blocks.{i}.{ln}", getattr(block, ln, None)))
        out.update(_norm_params("ln_final", getattr(self, "ln_final", None)))
        if hasattr(self, "unembed"):
            out["unembed.W_U"], out["unembed.b_U"] = self.unembed.W_U, self.unembed.b_U
        return out

    # ---------------- logit directions ----------------
    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """The residual direction [..., d_model] whose dot product with the final norm's
        *normalised* stream (``ln_final.hook_normalized``) gives each token's logit.

        TransformerLens' ``cache.logit_attrs`` divides the residual by the cached final
        scale (and centres it for LayerNorm) and dots it with this. Its own models fold the
        final norm's weight into ``W_U`` first; where ours is not folded, the weight (and the
        ``logit_scale`` multiplier) belong in the direction, or every attribution is off by
        the gain (issue 19: 0.70 instead of 1.86 on SmolLM2). The attributions then sum to the
        logit (difference) exactly up to the terms no component owns: the final LayerNorm's
        bias and ``b_U`` (both zero for RMSNorm models without an unembedding bias)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        W_U = self.W_U
        if isinstance(tokens, int):
            directions = W_U[:, tokens]
        else:
            directions = W_U[:, torch.as_tensor(tokens, device=W_U.device)].movedim(0, -1)
        if hasattr(self, "mlm_head"):  # a non-linear head: no exact direction exists
            return directions
        ln = getattr(self, "ln_final", None)
        w = ln.weight_or_none if ln is not None else None
        if w is not None:
            directions = directions * w
        return directions * self.cfg.logit_scale if self.cfg.logit_scale != 1.0 else directions

    def direction_attribution(
        self, cache: Any, direction: torch.Tensor, *, pos_slice: Any = -1,
        expand_neurons: bool = False,
    ) -> tuple[torch.Tensor, list[str]]:
        """Direct attribution of ``final_hidden @ direction`` to the components of the stream
        entering the model's last norm: attributions [component, *batch_pos] whose sum is the
        true value exactly, and their labels.

        ``direction`` [d_model] lives in the final hidden space (after the last norm), so this
        answers for models without an unembedding (a bare encoder such as ``minilm``: a probe
        or similarity direction) as well as for logit differences (``direction`` =
        ``tokens_to_residual_directions`` difference / gain; the bias of ``W_U`` is not
        included). Pre-norm models decompose the whole residual stream as TransformerLens'
        ``get_full_resid_decomposition`` (heads, neurons or MLP layers, embeddings, biases).
        In a post-norm model (BERT, MiniLM) every block re-normalises the stream, so only the
        last block's input to its last norm is additive: ``resid_mid`` of the last block plus
        its MLP (per neuron with ``expand_neurons``, then the output bias). A last LayerNorm's
        bias adds a constant, labelled ``final_norm_bias``.
        """
        from transformer_lens.utilities import Slice

        L, cfg = self.cfg.n_layers, self.cfg
        direction = direction.to(self.W_E.dtype)
        if cfg.norm_placement == "pre" or cfg.norm == "none":
            norm, scale_name = getattr(self, "ln_final", None), "ln_final.hook_scale"
            stack, labels = cache.get_full_resid_decomposition(
                expand_neurons=expand_neurons, pos_slice=pos_slice, return_labels=True)
        else:
            if cfg.attn_only or cfg.is_moe:
                raise InterpError("direction_attribution of a post-norm model needs a dense MLP "
                                  "in its last block.")
            norm, scale_name = self.blocks[L - 1].ln2, f"blocks.{L - 1}.ln2.hook_scale"
            stack, labels = self._post_norm_stack(cache, pos_slice, expand_neurons)
        if norm is None:
            return stack @ direction, labels
        gain = norm.weight_or_none
        v = direction * gain if gain is not None else direction
        if cfg.norm == "layernorm":  # (c - mean c) . v == c . (v - mean v)
            v = v - v.mean()
        scale = Slice(pos_slice).apply(cache[scale_name], dim=-2)[..., 0]
        attrs = (stack @ v) / scale
        if norm.bias_or_none is not None:
            const = (norm.bias_or_none @ direction).expand(attrs.shape[1:])
            attrs, labels = torch.cat([attrs, const[None]]), [*labels, "final_norm_bias"]
        return attrs, labels

    def _post_norm_stack(self, cache: Any, pos_slice: Any,
                         expand_neurons: bool) -> tuple[torch.Tensor, list[str]]:
        """The additive parts of the last post-norm block's input to its last norm."""
        from transformer_lens.utilities import Slice

        last = self.cfg.n_layers - 1
        sl = Slice(pos_slice)
        mid = sl.apply(cache[f"blocks.{last}.hook_resid_mid"], dim=-2)
        if not expand_neurons:
            mlp = sl.apply(cache[f"blocks.{last}.hook_mlp_out"], dim=-2)
            return torch.stack([mid, mlp]), [f"{last}_resid_mid", f"{last}_mlp_out"]
        post = sl.apply(cache[f"blocks.{last}.mlp.hook_post"], dim=-2)  # [..., d_mlp]
        mlp = self.blocks[last].mlp
        neurons = post.movedim(-1, 0)[..., None] * mlp.W_out.reshape(
            post.shape[-1], *([1] * (post.ndim - 1)), -1)  # [d_mlp, ..., d_model]
        bias = mlp.b_out.expand(mid.shape)
        labels = [f"{last}_resid_mid", *(f"L{last}N{n}" for n in range(post.shape[-1])), "bias"]
        return torch.cat([mid[None], neurons, bias[None]]), labels

    # ---------------- the config follows dtype and device ----------------
    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """After ``.to()`` / ``.cuda()`` / ``.half()``, record the parameters' dtype and device
        in ``cfg.extra`` so ``cfg.dtype`` / ``cfg.device`` (read by TL code such as
        ``head_detector``) say where the model is."""
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        p = next((t for t in self.parameters() if not t.is_meta), None)
        if p is not None and hasattr(self, "cfg"):
            placement = {"dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device)}
            if any(self.cfg.extra.get(k) != v for k, v in placement.items()):
                replace_config(self, self.cfg.replace(extra={**self.cfg.extra, **placement}))
        return out


def _norm_params(prefix: str, norm: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("w", "b"):
        t = getattr(norm, "_parameters", {}).get(name) if norm is not None else None
        if t is not None:
            out[f"{prefix}.{name}"] = t
    return out


def replace_config(model: torch.nn.Module, new: Any) -> None:
    """Give ``model`` and every submodule that shares its config the config ``new`` (configs
    are frozen: a change of record is a new object)."""
    old = model.cfg
    for module in model.modules():
        if getattr(module, "cfg", None) is old:
            module.cfg = new
