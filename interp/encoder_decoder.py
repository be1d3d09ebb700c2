"""HookedEncoderDecoder: the encoder-decoder sibling of HookedTransformer (T5-style).

Stacks ``encoder.{l}`` (bidirectional) and ``decoder.{l}`` (causal, with
``decoder.{l}.cross_attn``); everything else (embeddings, checks, TransformerLens glue, the
run-time switches of :mod:`interp.state`) comes from :class:`interp.base.HookedBase`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.base import HookedBase, ReturnType, resolve_return_type
from interp.components.block import Block
from interp.components.context import AttnContext
from interp.components.embeddings import Unembed
from interp.components.norms import make_norm
from interp.config import ModelConfig
from interp.config_memory import allocation_errors
from interp.errors import InterpError
from interp.generation import KVCache, cache_is_exact
from interp.hooks import hp
from interp.masks import Bidirectional, Causal, MaskSpec
from interp.positions import RelativePositionBias


class HookedEncoderDecoder(HookedBase):
    """Encoder-decoder with cross-attention (T5, Raffel et al. 2020; Vaswani et al. 2017).

    Stacks ``encoder.{l}`` (bidirectional) and ``decoder.{l}`` (causal, with
    ``decoder.{l}.cross_attn``), final norms ``encoder_final_ln`` and ``ln_final``. The token
    embedding is shared; ``hook_embed`` is the encoder's and ``hook_decoder_embed`` the decoder's
    (likewise ``hook_pos_embed`` / ``hook_decoder_pos_embed`` for absolute positions).
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        if not isinstance(cfg, ModelConfig) or cfg.architecture != "encoder_decoder":
            raise InterpError(
                "HookedEncoderDecoder needs a ModelConfig with architecture='encoder_decoder'."
            )
        self.cfg = cfg
        with allocation_errors(cfg):  # "this model needs N GB", not an allocator traceback
            self._build(cfg)
        self.tokenizer = tokenizer

    def _build(self, cfg: ModelConfig) -> None:
        """Every module and parameter of the model, initialised."""
        self._build_embeddings(cfg)
        self.hook_decoder_embed = HookPoint()  # [batch, pos, d_model]
        if hasattr(self, "pos_embed"):
            self.hook_decoder_pos_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional == "relative":
            buckets, dist = cfg.relative_buckets, cfg.relative_max_distance
            self.encoder_rel_bias = RelativePositionBias(cfg.n_heads, buckets, dist, True)
            self.decoder_rel_bias = RelativePositionBias(cfg.n_heads, buckets, dist, False)
        self.encoder = nn.ModuleList(
            [Block(cfg, stack="encoder", layer=i) for i in range(cfg.n_layers)]
        )
        self.decoder = nn.ModuleList(
            [Block(cfg, stack="decoder", layer=i, cross=True) for i in range(cfg.n_decoder_layers)]
        )
        if cfg.final_norm and cfg.norm != "none":
            self.encoder_final_ln = make_norm(cfg)
            self.ln_final = make_norm(cfg)
        if cfg.has_unembed:
            self.unembed = Unembed(cfg, self.embed if cfg.tie_embeddings else None)
        self._finish()

    def _own_mask(self) -> MaskSpec:
        """The decoder's self-attention mask without an override: causal."""
        return Causal()

    def _decoder_start(self) -> int:
        """The id the decoder input starts with (``cfg.extra['decoder_start_token_id']``, 0)."""
        return int(self.cfg.extra.get("decoder_start_token_id", 0))

    def encode(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Encoder states [batch, pos, d_model]."""
        tokens = self._check_tokens(tokens, "input tokens")
        B, T = tokens.shape
        self._check_length(T)
        padding = self._check_attention_mask(attention_mask, (B, T))
        pos = torch.arange(T, device=tokens.device)
        x = self._embed(tokens, pos, None)
        rel = getattr(self, "encoder_rel_bias", None)
        ctx = self._context(
            q_pos=pos, k_len=T, mask=Bidirectional(), padding=padding, rel=rel, dtype=x.dtype
        )
        for block in self.encoder:
            x = block(x, ctx)
        return self.encoder_final_ln(x) if hasattr(self, "encoder_final_ln") else x

    def forward(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        decoder_input: Int[torch.Tensor, "batch dec_pos"] | None = None,
        attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
        return_type: ReturnType = "auto",
        *,
        decoder_attention_mask: Int[torch.Tensor, "batch dec_pos"] | None = None,
        labels: Int[torch.Tensor, "batch dec_pos"] | None = None,
        encoder_output: Float[torch.Tensor, "batch pos d_model"] | None = None,
        past_kv: KVCache | None = None,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> Any:
        """(input tokens, decoder input tokens) -> decoder logits [batch, dec_pos, d_vocab].

        Either input may be text (a string or a list of strings), tokenized as ``to_tokens``
        does (the tokenizer's specials; ``prepend_bos`` / ``padding_side`` for this call) with
        its padding masked, so each row gives what it gives alone.
        With ``labels`` and no ``decoder_input``, the decoder input is the labels shifted right
        after ``cfg.extra['decoder_start_token_id']`` (0 by default), as in T5.
        ``return_type="auto"`` (the default) gives logits, or the decoder's final hidden
        states [batch, dec_pos, d_model] when the model has no unembedding."""
        return_type = resolve_return_type(return_type, hasattr(self, "unembed"))
        tokens, attention_mask = self._tokens_and_mask(tokens, attention_mask, prepend_bos,
                                                       padding_side)
        decoder_input, decoder_attention_mask = self._tokens_and_mask(  # T5 starts with pad
            decoder_input, decoder_attention_mask, prepend_bos, padding_side, infer_mask=False)
        if decoder_input is None:
            if labels is None:
                raise InterpError(
                    "HookedEncoderDecoder needs decoder_input (or labels to shift right)."
                )
            start = torch.full_like(labels[:, :1], self._decoder_start())
            decoder_input = torch.cat([start, labels[:, :-1].clamp(min=0)], 1)
        enc_tokens = self._check_tokens(tokens, "input tokens")
        enc_pad = self._check_attention_mask(attention_mask, tuple(enc_tokens.shape))
        enc = encoder_output
        if enc is None:
            enc = self.encode(enc_tokens, attention_mask)
        dec = self._check_tokens(decoder_input, "decoder_input")
        x = self._decode(dec, enc, enc_pad, decoder_attention_mask, past_kv)
        if hasattr(self, "ln_final"):
            x = self.ln_final(x)
        if return_type is None:
            return None
        if return_type == "hidden":
            return x
        if not hasattr(self, "unembed"):
            raise InterpError(
                "This model has no unembedding; use return_type='hidden' (the default) for its "
                "final states."
            )
        scale = self.cfg.logit_scale
        logits = self.unembed(x * scale if scale != 1.0 else x)
        if return_type == "logits":
            return logits
        loss = self._loss(logits, dec, labels)
        return loss if return_type == "loss" else (logits, loss)

    def _decode(
        self,
        dec: torch.Tensor,
        enc: torch.Tensor,
        enc_pad: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        past_kv: KVCache | None,
    ) -> torch.Tensor:
        """The decoder stack over ``dec`` [batch, dec_pos], cross-attending to ``enc``."""
        B, T = dec.shape
        past_len = past_kv.seq_len if past_kv is not None else 0
        self._check_length(past_len + T)
        padding = None
        if past_kv is None:
            padding = self._check_attention_mask(decoder_attention_mask, (B, past_len + T))
        q_pos = torch.arange(past_len, past_len + T, device=dec.device)
        x = hp(self.hook_decoder_embed, self.embed(dec))
        if hasattr(self, "pos_embed"):
            pe = self.pos_embed(q_pos)[None].expand(B, -1, -1)
            x = x + hp(self.hook_decoder_pos_embed, pe)
        ctx = self._context(
            q_pos=q_pos,
            k_len=past_len + T,
            mask=self.effective_mask,
            padding=padding,
            rel=getattr(self, "decoder_rel_bias", None),
            dtype=x.dtype,
        )
        cross = AttnContext(
            q_pos=q_pos,
            k_len=enc.shape[1],
            mask=Bidirectional(),
            padding=enc_pad,
            penalty=None,
            temperature=ctx.temperature,
        )
        for i, block in enumerate(self.decoder):
            past = past_kv.layers[i] if past_kv is not None else None
            x = block(x, ctx, enc=enc, cross_ctx=cross, past=past)
        return x

    def _loss(
        self, logits: torch.Tensor, dec: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean cross-entropy against ``labels`` (-100 ignored), else the next decoder token."""
        if labels is None:
            labels = dec[:, 1:]
            logits = logits[:, :-1]
        else:
            self._check_labels(labels, dec.shape, logits.shape[-1], "the decoder input's shape")
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        max_new_tokens: int = 20,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
    ) -> Int[torch.Tensor, "batch dec_pos"]:
        """Greedy decoding with a decoder KV cache; returns decoder tokens including the start
        token."""
        enc_tokens = self._check_tokens(tokens, "input tokens")
        enc = self.encode(enc_tokens, attention_mask)
        start = self._decoder_start()
        out = torch.full(
            (enc_tokens.shape[0], 1), start, dtype=torch.long, device=enc_tokens.device
        )
        # a soft penalty or a non-causal override lets earlier positions see later ones: recompute
        exact = cache_is_exact(self.attention_settings, 1, 1 + max_new_tokens)
        cache = KVCache(self.cfg.n_decoder_layers) if exact else None
        step = out
        for _ in range(max_new_tokens):
            logits = self(
                enc_tokens,
                step if cache is not None else out,
                attention_mask=attention_mask,
                encoder_output=enc,
                past_kv=cache,
            )
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            step = nxt
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return out
