"""What every interp model shares: embeddings, input checks, attention contexts, TL glue.

:class:`HookedBase` subclasses TransformerLens' ``HookedRootModule``, so ``run_with_hooks``,
``hooks()``, ``names_filter`` and backward hooks are TransformerLens' own, and
``run_with_cache`` returns a real ``transformer_lens.ActivationCache``. Its two subclasses are
:class:`interp.model.HookedTransformer` (decoder-only and encoder-only) and
:class:`interp.encoder_decoder.HookedEncoderDecoder`. The run-time state it carries is listed
in :mod:`interp.state`; the methods that change it come from
:class:`interp.interventions.Interventions`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from interp.components.context import AttnContext, local_context
from interp.components.embeddings import Embed, PosEmbed
from interp.components.learned_masks import LEARNED_MASK_INIT
from interp.components.moe import MoE
from interp.components.norms import make_norm
from interp.config import ModelConfig
from interp.errors import InterpError
from interp.hooks import (
    HookDict,
    as_activation_cache,
    cache_names_filter,
    check_hook_names,
    hp,
    note_recorded_memory,
)
from interp.interventions import Interventions
from interp.masks import MaskSpec
from interp.perf.memory import recording
from interp.positions import RelativePositionBias, alibi_bias, alibi_slopes, rope_cos_sin
from interp.state import AttentionOverride
from interp.text_inputs import TextInputs

#: What a forward returns. ``"auto"`` (the default) is ``"logits"`` for a model with an
#: unembedding and ``"hidden"`` (the final residual, after the final norm) for one without, as
#: transformers' ``BertModel`` returns ``last_hidden_state``; ``None`` returns nothing (for
#: hooks only).
ReturnType = Literal["auto", "logits", "loss", "both", "hidden"] | None
RETURN_TYPES = ("auto", "logits", "loss", "both", "hidden", None)


def check_return_type(return_type: Any) -> None:
    if return_type not in RETURN_TYPES:
        raise InterpError(
            "return_type must be 'auto', 'logits', 'loss', 'both', 'hidden' or None, "
            f"got {return_type!r}."
        )


def resolve_return_type(return_type: Any, has_unembed: bool) -> ReturnType:
    """``return_type`` checked, with ``"auto"`` made concrete: a bare encoder's natural
    output is its hidden states, so a plain ``model(tokens)`` answers instead of raising;
    asking such a model for logits or a loss explicitly still raises."""
    check_return_type(return_type)
    if return_type == "auto":
        return "logits" if has_unembed else "hidden"
    return return_type


def _shape_or_type(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


class HookedBase(TextInputs, Interventions, HookedRootModule):
    """Shared plumbing: embeddings, position machinery, input checks, TL glue, tokenizer
    helpers. Subclasses call :meth:`_build_embeddings` first and :meth:`_finish` last."""

    cfg: ModelConfig

    def _build_embeddings(self, cfg: ModelConfig) -> None:
        self.attention_override: AttentionOverride | None = None  # see interp.state
        self.tokenizer: Any = None
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_tokens = HookPoint()  # [batch, pos] token ids (opt-in: cfg.use_hook_tokens)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional in ("learned", "sinusoidal"):
            self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model, learned=cfg.positional == "learned")
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.n_token_types:
            self.token_type_embed = Embed(cfg.n_token_types, cfg.d_model)
            self.hook_token_type_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.embed_norm:
            self.ln_embed = make_norm(cfg)
        self.embed.scale = cfg.embed_scale  # Gemma: sqrt(d_model); token embeddings only
        for name, table in self.computed_buffers().items():
            self.register_buffer(name, table, persistent=False)

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The model-level buffers that are a function of the config, not weights (ALiBi's
        slopes); loading builds on the meta device and fills these from here afterwards."""
        if self.cfg.positional == "alibi":
            return {"alibi_slopes": alibi_slopes(self.cfg.n_heads)}
        return {}

    def _finish(self) -> None:
        self.init_weights()
        self.setup()
        self.mod_dict = HookDict(self.mod_dict)
        self.hook_dict = HookDict(self.hook_dict)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init: N(0, init_std) for matrices and embeddings, zeros for biases, ones
        for norms."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            # built for loading (interp.loading): no data to fill, and normal_ on meta imports
            # torch._dynamo (~5 s)
            if p.is_meta:
                continue
            last = name.rsplit(".", 1)[-1]
            if last in LEARNED_MASK_INIT:  # learned masks start open: plain attention
                nn.init.constant_(p, LEARNED_MASK_INIT[last])
            elif last in ("w",) or (last == "weight" and p.ndim == 1):
                nn.init.ones_(p)
            elif last in ("b", "bias", "b_U", "W_rel") or p.ndim == 1:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    # ---------------- input checks ----------------
    def _check_tokens(
        self, tokens: Any, name: str = "tokens", vocab: int | None = None
    ) -> Int[torch.Tensor, "batch pos"]:
        if isinstance(tokens, str | list) and self.tokenizer is not None:
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, torch.Tensor):
            raise InterpError(
                f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}."
            )
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InterpError(
                f"{name} must hold integer token ids, got dtype {tokens.dtype}; use tokens.long()."
            )
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InterpError(
                f"{name} must have shape [batch, pos] (or [pos]), got {tuple(tokens.shape)}."
            )
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise InterpError(
                f"{name} is empty (shape {tuple(tokens.shape)}); pass at least one token."
            )
        vocab = vocab or self.cfg.d_vocab
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise InterpError(
                f"{name} contain id {lo if lo < 0 else hi}, outside the vocabulary 0..{vocab - 1}."
            )
        return tokens.long()

    def _check_length(self, total: int) -> None:
        if self.cfg.positional == "learned" and total > self.cfg.n_ctx:
            raise InterpError(
                f"Sequence length {total} exceeds n_ctx={self.cfg.n_ctx} of this model's "
                "learned positions; truncate the input."
            )

    def _check_attention_mask(
        self, attention_mask: Any, shape: tuple[int, int]
    ) -> torch.Tensor | None:
        """The padding mask as bool [batch, pos], or None when nothing is padded."""
        if attention_mask is None:
            return None
        m = attention_mask
        if not isinstance(m, torch.Tensor) or m.shape != torch.Size(shape):
            raise InterpError(
                f"attention_mask must be a tensor of shape {shape} (1 = token, 0 = padding), "
                f"got {_shape_or_type(attention_mask)}."
            )
        m = attention_mask.bool()
        return None if bool(m.all()) else m

    @staticmethod
    def _check_labels(labels: Any, shape: tuple[int, ...], vocab: int, what: str) -> None:
        """Labels must be integer ids of ``shape`` in 0..vocab-1, or -100 (ignored)."""
        is_tensor = isinstance(labels, torch.Tensor)
        if not is_tensor or labels.shape != shape or labels.is_floating_point():
            raise InterpError(
                f"labels must be integer ids of {what} {tuple(shape)}, "
                f"got {_shape_or_type(labels)}."
            )
        if bool(((labels < 0) & (labels != -100)).any()) or bool((labels >= vocab).any()):
            raise InterpError(f"labels must be ids in 0..{vocab - 1} or -100 (ignored).")

    # ---------------- embeddings and contexts ----------------
    def _embed(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        positions: Int[torch.Tensor, " pos"] | Int[torch.Tensor, "batch pos"],
        token_type_ids: Int[torch.Tensor, "batch pos"] | None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Token (+ position, + token type) embeddings; ``positions`` per row [batch, pos] when
        padding shifts them (left padding: each row's first real token is position 0)."""
        tokens = hp(self.hook_tokens, tokens)  # as TL: the embedding sees edits, the loss not
        x = hp(self.hook_embed, self.embed(tokens))  # [batch, pos, d_model]
        if hasattr(self, "pos_embed"):
            pe = self.pos_embed(positions)
            if pe.ndim == 2:
                pe = pe[None].expand(tokens.shape[0], -1, -1)
            x = x + hp(self.hook_pos_embed, pe)  # [batch, pos, d_model] (batch kept for TL)
        if hasattr(self, "token_type_embed"):
            tt = torch.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + hp(self.hook_token_type_embed, self.token_type_embed(tt))
        if hasattr(self, "ln_embed"):
            x = self.ln_embed(x)
        return x

    def _context(
        self,
        *,
        q_pos: torch.Tensor,
        k_len: int,
        mask: MaskSpec,
        padding: torch.Tensor | None,
        rel: RelativePositionBias | None,
        dtype: torch.dtype,
        row_pos: torch.Tensor | None = None,
    ) -> AttnContext:
        """The attention context of one stack's forward (penalty and temperature in effect).
        ``row_pos`` [batch, pos]: per-row positions of the queries for RoPE (left padding)."""
        cfg, settings = self.cfg, self.attention_settings
        k_pos = torch.arange(k_len, device=q_pos.device)
        pos_bias = None
        if cfg.positional == "alibi":
            pos_bias = alibi_bias(self.alibi_slopes.float(), q_pos, k_pos)
        elif rel is not None:
            pos_bias = rel(q_pos, k_pos)
        rope = None
        if cfg.positional == "rope":
            rope_pos = q_pos if row_pos is None else row_pos
            rope = rope_cos_sin(rope_pos, cfg.rotary_dim, cfg.rope_base, cfg.rope_interleaved,
                                dtype, cfg.rope_scaling, cfg.n_ctx, k_len)
        ctx = AttnContext(
            q_pos=q_pos,
            k_len=k_len,
            mask=mask,
            padding=padding,
            penalty=settings.soft_mask_penalty,
            temperature=settings.temperature,
            pos_bias=pos_bias,
            rope=rope,
        )
        if cfg.layer_types is not None and "sliding" in cfg.layer_types:
            ctx.local = local_context(cfg, ctx, dtype, row_pos)
        return ctx

    def moe_losses(self) -> dict[str, torch.Tensor]:
        """The last forward's MoE losses, weighted by the config: ``aux`` (Switch load
        balancing, mean over MoE layers, times ``moe_aux_loss_coef``) and ``z`` (router
        z-loss times its coef)."""
        moes = [m for m in self.modules() if isinstance(m, MoE) and m.last_losses]
        if not moes:
            zero = torch.zeros((), device=self.embed.W_E.device)
            return {"aux": zero, "z": zero}
        aux = torch.stack([m.last_losses["aux"] for m in moes]).mean() * self.cfg.moe_aux_loss_coef
        z = torch.stack([m.last_losses["z"] for m in moes]).mean() * self.cfg.router_z_loss_coef
        return {"aux": aux, "z": z}

    # ---------------- TransformerLens glue ----------------
    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict]:
        """As TransformerLens, but returns an ``ActivationCache`` (TL 4.3 returns a plain dict).
        Hook names given as a string or list must exist (TL would silently cache nothing).

        The first value is the forward's output: by default (``return_type="auto"``) logits,
        or the final hidden states [batch, pos, d_model] for a model without an unembedding
        (a bare encoder such as ``minilm``); pass ``return_type=`` to choose. Every forward
        keyword passes through (``prepend_bos=``, ``padding_side=``, ``attention_mask=``,
        ``start_at_layer=``, ...): text is tokenized by the model's BOS rule with its padding
        masked, so each row of a batch records what it records alone."""
        kwargs["names_filter"] = cache_names_filter(
            self.hook_dict, kwargs.get("names_filter"), self.use_attn_result, self.use_flags
        )
        with recording():
            out, cache = super().run_with_cache(
                *model_args, remove_batch_dim=remove_batch_dim, **kwargs
            )
        note_recorded_memory(cache)
        return out, as_activation_cache(cache, self, return_cache_object, not remove_batch_dim)

    def remove_all_hook_fns(
        self,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """As TransformerLens, but only hook points holding a hook are visited.

        Why: every ``model.hooks(...)`` / ``run_with_hooks`` exit lands here, and TL resets all
        hook points, each reset assigning two lists through ``nn.Module.__setattr__``: 3.4 ms
        per exit on SmolLM2 (784 hook points), whatever the number of hooks, now 0.07 ms.
        Batched interventions exit such a context once per layer or pair (causal tracing,
        integrated gradients, activation patching: ~10,800 exits in the default ``interp ffn
        smollm2-135m``; BENCHMARKS.md, "FFN throughput"). A hook point with no handle has
        nothing to remove, so skipping it changes nothing else."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"Invalid direction {direction}")
        for point in self.hook_points():
            if point.fwd_hooks or point.bwd_hooks:
                point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def check_hook_names(self, names: list[str]) -> None:
        """Raise :class:`interp.errors.HookNameError` for the first unknown name."""
        check_hook_names(self.hook_dict, names)

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        if not hasattr(self, "unembed"):
            raise InterpError(
                "This model has no unembedding (a bare encoder); vocabulary projections need "
                "a language-model head."
            )
        return self.unembed.W_U

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """Unembedding directions [..., d_model] of tokens (TransformerLens' logit_attrs uses
        it)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        t = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, t].movedim(0, -1)

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    def param_count(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
