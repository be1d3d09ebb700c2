"""HookedTransformer: one hookable implementation of every documented transformer variant.

Decoder-only and encoder-only models are :class:`HookedTransformer` (stack ``blocks``);
encoder-decoder models are the sibling :class:`~interp.encoder_decoder.HookedEncoderDecoder`
(stacks ``encoder`` and ``decoder``, with ``decoder.{l}.cross_attn``); :func:`build_model`
picks the right one for a config. What both share (embeddings, input checks, TransformerLens
glue, tokenizer helpers) is :class:`interp.base.HookedBase`; the run-time switches analyses
flip are listed in :mod:`interp.state`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from interp.base import HookedBase, ReturnType, resolve_return_type
from interp.components.block import Block
from interp.components.embeddings import MLMHead, Unembed
from interp.components.norms import make_norm
from interp.config import ModelConfig
from interp.config_memory import allocation_errors
from interp.encoder_decoder import HookedEncoderDecoder
from interp.errors import InterpError
from interp.generation import DecoderGeneration, KVCache
from interp.memory import ModelMemory
from interp.positions import RelativePositionBias
from interp.tl_weights import TLWeights
from interp.tokenize import positions_from_mask

__all__ = ["HookedEncoderDecoder", "HookedTransformer", "KVCache", "ReturnType", "build_model"]


class HookedTransformer(TLWeights, DecoderGeneration, HookedBase):
    """A decoder-only or encoder-only transformer with TransformerLens hook names.

    >>> import torch, interp
    >>> cfg = interp.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
    >>> model = interp.HookedTransformer(cfg)
    >>> logits, cache = model.run_with_cache(torch.randint(0, 100, (2, 8)))
    >>> tuple(cache["pattern", 0].shape)
    (2, 4, 8, 8)
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise InterpError(
                f"HookedTransformer needs an interp.ModelConfig, got {type(cfg).__name__}."
            )
        if cfg.architecture == "encoder_decoder":
            raise InterpError(
                "architecture='encoder_decoder' is built by interp.HookedEncoderDecoder."
            )
        self.cfg = cfg
        with allocation_errors(cfg):  # "this model needs N GB", not an allocator traceback
            self._build(cfg)
        self.tokenizer = tokenizer

    def _build(self, cfg: ModelConfig) -> None:
        """Every module and parameter of the model, initialised."""
        self._build_embeddings(cfg)
        if cfg.positional == "relative":
            self.rel_bias = RelativePositionBias(
                cfg.n_heads,
                cfg.relative_buckets,
                cfg.relative_max_distance,
                bidirectional=not cfg.mask.is_causal,
            )
        self.blocks = nn.ModuleList(
            [
                Block(cfg, stack="blocks", layer=i, moe=cfg.is_moe_layer(i))
                for i in range(cfg.n_layers)
            ]
        )
        # the memory layers' run-time stores (interp.memory); None without memory
        self.memory = None if cfg.memory_kind is None else ModelMemory(self, {
            i: b.attn.memory.store for i, b in enumerate(self.blocks) if b.attn.memory})
        if cfg.final_norm and cfg.norm != "none":
            self.ln_final = make_norm(cfg)
        if cfg.has_unembed:
            if cfg.mlm_head:
                self.mlm_head = MLMHead(cfg)
            self.unembed = Unembed(cfg, self.embed if cfg.tie_embeddings else None)
        self._finish()

    def forward(
        self,
        input: Any,
        return_type: ReturnType = "auto",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        tokens: Int[torch.Tensor, "batch pos"] | None = None,
        shortformer_pos_embed: None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache: KVCache | None = None,
        *,
        token_type_ids: Int[torch.Tensor, "batch pos"] | None = None,
        labels: Int[torch.Tensor, "batch pos"] | None = None,
        past_kv: KVCache | None = None,
        residual: Float[torch.Tensor, "batch pos d_model"] | None = None,
    ) -> Any:
        """input -> logits [batch, pos, d_vocab] (or loss, both, hidden, None).

        ``input``: token ids [batch, pos] or [pos], or text (a string or a list of strings),
        tokenized by the model's BOS rule (``prepend_bos=`` overrides it for this call) and
        padded on ``padding_side`` with the padding masked, so each row gives what it gives
        alone. ``attention_mask`` is the tokenizer's (1 = token, 0 = padding); with left padding
        the positions of each row start at its first real token (learned, sinusoidal and RoPE
        positions, as TransformerLens). The positional order is TransformerLens' (input,
        return_type, loss_per_token, prepend_bos, padding_side, start_at_layer, tokens,
        shortformer_pos_embed, attention_mask, stop_at_layer, past_kv_cache); a tensor second
        argument is still read as the attention mask (interp's earlier order).
        ``shortformer_pos_embed`` must stay None (interp adds positions to the residual).

        ``return_type`` defaults to ``"auto"``: logits when the model has an unembedding, the
        final hidden states [batch, pos, d_model] (after the final norm) when it has none (a
        bare encoder such as ``minilm``, like transformers' ``BertModel``). Asking such a model
        for ``"logits"``, ``"loss"`` or ``"both"`` raises. ``loss_per_token=True`` gives the
        loss per position ([batch, pos - 1] for next-token prediction, 0 on padding) instead of
        the mean. ``labels`` defaults to the next token for decoders (padding ignored); encoders
        need ``labels`` for a loss (-100 = ignored, as in MLM).

        ``past_kv`` (or TransformerLens' name ``past_kv_cache``) appends to a :class:`KVCache`.
        ``stop_at_layer`` returns the residual stream before that block (for probes);
        ``start_at_layer`` starts from a residual: TransformerLens' form passes the residual as
        ``input`` and the token ids as ``tokens=`` (for the mask, positions and loss), interp's
        form passes the ids as ``input`` and ``residual=``. Both layer arguments take negative
        indices as TransformerLens (-1 = the last block).

        Long because it is TransformerLens' forward: its eleven arguments, documented here,
        beside interp's own; the work is in the helpers it calls.
        """
        if isinstance(return_type, torch.Tensor):  # interp's earlier order: (tokens, mask)
            if attention_mask is not None:
                raise InterpError("attention_mask given twice (second argument and keyword).")
            attention_mask, return_type = return_type, "auto"
        if shortformer_pos_embed is not None:
            raise InterpError("shortformer_pos_embed is not used by interp models (positions are "
                              "added to the residual stream); leave it None.")
        past_kv = self._one_cache(past_kv, past_kv_cache)
        start_at_layer = self._layer_index("start_at_layer", start_at_layer)
        stop_at_layer = self._layer_index("stop_at_layer", stop_at_layer)
        return_type = resolve_return_type(return_type, hasattr(self, "unembed"))
        input, residual, have_ids = self._split_start_input(input, tokens, residual,
                                                           start_at_layer)
        input, attention_mask = self._tokens_and_mask(
            input, attention_mask, prepend_bos, padding_side,
            infer_mask=have_ids and (past_kv is None or past_kv.seq_len == 0))
        tokens = self._check_tokens(input)
        B, T = tokens.shape
        token_type_ids = self._check_token_types(token_type_ids, tokens)
        past_len = past_kv.seq_len if past_kv is not None else 0
        self._check_length(past_len + T)
        if past_kv is not None:
            attention_mask = self._extend_past_mask(past_kv, attention_mask, tokens)
        padding = self._check_attention_mask(attention_mask, (B, past_len + T))
        q_pos = torch.arange(past_len, past_len + T, device=tokens.device)
        row_pos = self._row_positions(padding, past_len)
        if start_at_layer is None:
            x = self._embed(tokens, q_pos if row_pos is None else row_pos, token_type_ids)
        else:
            x = residual
        ctx = self._context(
            q_pos=q_pos,
            k_len=past_len + T,
            mask=self.effective_mask,
            padding=padding,
            rel=getattr(self, "rel_bias", None),
            dtype=x.dtype,
            row_pos=row_pos,
        )
        token_mask = None if padding is None else padding[:, past_len:]
        for i, block in enumerate(self.blocks):
            if start_at_layer is not None and i < start_at_layer:
                continue
            if stop_at_layer is not None and i >= stop_at_layer:
                return x
            past = past_kv.layers[i] if past_kv is not None else None
            x = block(x, ctx, past=past, token_mask=token_mask)
        if past_kv is not None:
            past_kv.commit(past_len)
        if stop_at_layer is not None:  # = n_layers: the residual after the last block
            return x
        if hasattr(self, "ln_final"):
            x = self.ln_final(x)
        if not have_ids and return_type in ("loss", "both") and labels is None:
            raise InterpError("A loss from start_at_layer with a residual input needs tokens= "
                              "(the token ids of that residual).")
        return self._output(x, return_type, tokens, token_mask, labels, loss_per_token)

    @staticmethod
    def _one_cache(past_kv: KVCache | None, past_kv_cache: KVCache | None) -> KVCache | None:
        """``past_kv`` and TransformerLens' ``past_kv_cache`` name the same argument."""
        if past_kv is not None and past_kv_cache is not None and past_kv is not past_kv_cache:
            raise InterpError("past_kv and past_kv_cache are the same argument; pass one.")
        cache = past_kv if past_kv is not None else past_kv_cache
        if cache is not None and not isinstance(cache, KVCache):
            raise InterpError("past_kv_cache must be an interp.KVCache (alias "
                              "HookedTransformerKeyValueCache; make one with "
                              f".init_cache(model.cfg, device)), got {type(cache).__name__}.")
        return cache

    @staticmethod
    def _split_start_input(
        input: Any, tokens: Any, residual: Any, start_at_layer: int | None
    ) -> tuple[Any, Any, bool]:
        """(token ids or text, residual, whether real ids were given) from either
        ``start_at_layer`` form: TransformerLens' (residual as ``input``, ids as ``tokens=``) or
        interp's (ids as ``input``, ``residual=``)."""
        floating = isinstance(input, torch.Tensor) and input.is_floating_point()
        if start_at_layer is None:
            if tokens is not None:
                raise InterpError("tokens= goes with start_at_layer= (the ids of the residual "
                                  "passed as input); pass the ids as the input otherwise.")
            return input, residual, True
        if residual is None and floating:
            if input.ndim != 3:
                raise InterpError("With start_at_layer, a float input is the residual "
                                  f"[batch, pos, d_model], got shape {tuple(input.shape)}.")
            if tokens is None:  # shapes only: no mask, no positions, no loss
                dummy = torch.zeros(input.shape[:2], dtype=torch.long, device=input.device)
                return dummy, input, False
            return tokens, input, True
        if residual is None:
            raise InterpError(
                "start_at_layer needs residual= (the stream entering that block), or the "
                "residual as the input and the token ids as tokens=."
            )
        return input, residual, True

    def _row_positions(self, padding: torch.Tensor | None, past_len: int) -> torch.Tensor | None:
        """Per-row positions [batch, pos] of the new tokens when padding would shift them, for
        the schemes that read absolute positions (learned, sinusoidal, RoPE); None when
        nothing is padded (every row counts from 0) or positions are relative (ALiBi, T5)."""
        if padding is None or self.cfg.positional not in ("learned", "sinusoidal", "rope"):
            return None
        return positions_from_mask(padding)[:, past_len:]

    def _layer_index(self, name: str, value: int | None) -> int | None:
        """A start/stop layer argument, checked, with a negative index counted from the end."""
        n = self.cfg.n_layers
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
            raise InterpError(f"{name} must be an integer in -{n}..{n}, got {value!r}.")
        return value + n if value < 0 else value

    def _check_token_types(
        self, token_type_ids: torch.Tensor | None, tokens: torch.Tensor
    ) -> torch.Tensor | None:
        if token_type_ids is None:
            return None
        if not hasattr(self, "token_type_embed"):
            raise InterpError(
                "This model has no token types (n_token_types=0); remove token_type_ids."
            )
        token_type_ids = self._check_tokens(
            token_type_ids, "token_type_ids", vocab=self.cfg.n_token_types
        )
        if token_type_ids.shape != tokens.shape:
            raise InterpError(
                f"token_type_ids must have the tokens' shape {tuple(tokens.shape)}, "
                f"got {tuple(token_type_ids.shape)}."
            )
        return token_type_ids

    @staticmethod
    def _extend_past_mask(
        past_kv: KVCache, attention_mask: torch.Tensor | None, tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """The padding mask over cached and new positions; the cache keeps it for the next
        step (new tokens without a mask count as real tokens)."""
        if attention_mask is None and past_kv.attention_mask is not None:
            attention_mask = torch.ones(tokens.shape, dtype=torch.long, device=tokens.device)
        if attention_mask is not None:
            if past_kv.attention_mask is not None and past_kv.seq_len != 0:
                attention_mask = torch.cat([past_kv.attention_mask, attention_mask], 1)
            past_kv.attention_mask = attention_mask
        return attention_mask

    def _output(
        self,
        x: torch.Tensor,
        return_type: ReturnType,
        tokens: torch.Tensor,
        padding: torch.Tensor | None,
        labels: torch.Tensor | None,
        per_token: bool = False,
    ) -> Any:
        """The final residual (after ln_final) -> what ``return_type`` asks for."""
        if return_type is None:
            return None
        if return_type == "hidden":
            return x
        if not hasattr(self, "unembed"):
            raise InterpError(
                "This model has no unembedding (a bare encoder); use return_type='hidden' "
                "(the default) for its final states."
            )
        if self.cfg.logit_scale != 1.0:
            x = x * self.cfg.logit_scale
        if hasattr(self, "mlm_head"):
            x = self.mlm_head(x)
        logits = self.unembed(x)  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        loss = self.loss(logits, tokens, padding, labels, per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss(
        self,
        logits: Float[torch.Tensor, "batch pos d_vocab"],
        tokens: Int[torch.Tensor, "batch pos"],
        padding: torch.Tensor | None,
        labels: torch.Tensor | None,
        per_token: bool = False,
    ) -> Float[torch.Tensor, ""] | Float[torch.Tensor, "batch pos"]:
        """Mean cross-entropy: next-token for decoders, ``labels`` (-100 ignored) otherwise;
        ``per_token`` gives it per position instead (0 where ignored), as TransformerLens'
        ``loss_per_token``."""
        if labels is None:
            if self.cfg.architecture != "decoder":
                raise InterpError(
                    "An encoder's loss needs labels= (token ids to predict, -100 where ignored)."
                )
            labels = tokens[:, 1:].clone()
            if padding is not None:
                labels[~padding[:, 1:]] = -100
            logits = logits[:, :-1]
        else:
            self._check_labels(labels, logits.shape[:-1], logits.shape[-1], "the tokens' shape")
        if labels.numel() == 0:
            raise InterpError("A loss needs at least two tokens per sequence.")
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if per_token:
            each = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none")
            return each.view(labels.shape)
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)

    def input_to_embed(
        self,
        input: Any,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: torch.Tensor | None = None,
        past_kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor | None]:
        """TransformerLens' ``input_to_embed``: (residual entering block 0 [batch, pos,
        d_model], tokens, shortformer_pos_embed (always None: interp adds positions to the
        residual), attention_mask or None when nothing is padded). The residual is what
        ``forward`` embeds (per-row positions under padding, BERT's embedding norm)."""
        past_len = past_kv_cache.seq_len if past_kv_cache is not None else 0
        input, attention_mask = self._tokens_and_mask(input, attention_mask, prepend_bos,
                                                      padding_side, infer_mask=past_len == 0)
        tokens = self._check_tokens(input)
        mask = attention_mask
        if past_kv_cache is not None and past_kv_cache.attention_mask is not None:
            new = mask if mask is not None else torch.ones_like(tokens)
            mask = torch.cat([past_kv_cache.attention_mask, new], 1)
        padding = self._check_attention_mask(mask, (tokens.shape[0], past_len + tokens.shape[1]))
        row_pos = self._row_positions(padding, past_len)
        q_pos = torch.arange(past_len, past_len + tokens.shape[1], device=tokens.device)
        x = self._embed(tokens, q_pos if row_pos is None else row_pos, None)
        return x, tokens, None, attention_mask

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[torch.Tensor, " d_model"]:
        """Sum of attention-out and MLP-out biases before ``layer`` (TransformerLens semantics)."""
        out = torch.zeros(self.cfg.d_model, device=self.device)
        for i in range(layer):
            blk = self.blocks[i]
            out = out + blk.attn.b_O
            if include_mlp_biases and hasattr(blk, "mlp") and hasattr(blk.mlp, "b_out"):
                out = out + blk.mlp.b_out
        if mlp_input and layer < self.cfg.n_layers:
            out = out + self.blocks[layer].attn.b_O
        return out


def build_model(
    cfg: ModelConfig, tokenizer: Any = None
) -> HookedTransformer | HookedEncoderDecoder:
    """The right class for a config."""
    cls = HookedEncoderDecoder if cfg.architecture == "encoder_decoder" else HookedTransformer
    return cls(cfg, tokenizer=tokenizer)
