"""HookedTransformer: one hookable implementation of every documented transformer variant.

It subclasses TransformerLens' ``HookedRootModule``, so ``run_with_hooks``, ``hooks()``,
``names_filter`` and backward hooks are TransformerLens' own, and ``run_with_cache`` returns a
real ``transformer_lens.ActivationCache`` whose helpers (``decompose_resid``,
``accumulated_resid``, ``stack_head_results``, ``logit_attrs``) work unchanged.

Decoder-only and encoder-only models are :class:`HookedTransformer` (stack ``blocks``);
encoder-decoder models are the sibling :class:`HookedEncoderDecoder` (stacks ``encoder`` and
``decoder``, with ``decoder.{l}.cross_attn``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from interp.components import (
    ACT_FNS,
    AttnContext,
    Block,
    LayerKV,
    LayerNorm,
    MoE,
    Runtime,
    hp,
    make_norm,
)
from interp.config import ModelConfig
from interp.errors import InterpError, unknown_hook_error
from interp.perf.kernels import Linear, linear
from interp.masks import Bidirectional, Causal, MaskSpec
from interp.perf.memory import note_recorded, recording, reuses_recorded_memory
from interp.positions import (
    RelativePositionBias,
    alibi_bias,
    alibi_slopes,
    rope_cos_sin,
    sinusoidal_table,
)

ReturnType = Literal["logits", "loss", "both", "hidden"] | None


def _note_recorded_memory(cache: Any) -> None:
    """Report the CPU bytes a recording kept (unique storages: views share them) to
    :mod:`interp.perf.memory`, whose default policy keeps up to twice that much freed memory for the
    next recording instead of faulting it in afresh."""
    if not reuses_recorded_memory():
        return
    values = cache.cache_dict.values() if isinstance(cache, ActivationCache) else cache.values()
    storages = {}
    for v in values:
        if isinstance(v, torch.Tensor) and v.device.type == "cpu":
            st = v.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    note_recorded(sum(storages.values()))


class _HookDict(dict):
    """A dict of hook points whose missing keys raise an error naming the closest real ones."""

    def __missing__(self, key: str) -> Any:
        raise unknown_hook_error(str(key), self.keys())


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))  # [d_vocab, d_model]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Learned (a parameter) or sinusoidal (a fixed buffer) absolute positions, ``W_pos`` [n_ctx, d_model]."""

    def __init__(self, n_ctx: int, d_model: int, learned: bool):
        super().__init__()
        self.learned = learned
        if learned:
            self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))
        else:
            self.register_buffer("W_pos", sinusoidal_table(n_ctx, d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.learned and int(positions.max()) >= self.W_pos.shape[0]:
            return sinusoidal_table(int(positions.max()) + 1, self.W_pos.shape[1], self.W_pos.device, self.W_pos.dtype)[positions]
        return self.W_pos[positions]


class Unembed(nn.Module):
    """Residual -> logits. ``W_U`` [d_model, d_vocab] is a view of ``weight`` (or of W_E, tied)."""

    def __init__(self, cfg: ModelConfig, tied_to: Embed | None):
        super().__init__()
        self._tied = [tied_to] if tied_to is not None else None  # a list: not a registered submodule
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(cfg.d_vocab_out, cfg.d_model))  # [d_vocab, d_model]
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out)) if cfg.unembed_bias else None

    @property
    def _weight(self) -> torch.Tensor:
        return self._tied[0].W_E if self._tied else self.weight

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        return self._weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self._weight, self.b_U)


class MLMHead(nn.Module):
    """BERT's prediction-head transform: dense, activation, LayerNorm (Devlin et al. 2019)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.act = ACT_FNS[cfg.act if not cfg.is_gated else "gelu"]
        self.ln = LayerNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.act(self.dense(x)))


class KVCache:
    """Per-layer keys and values for incremental decoding (:meth:`HookedTransformer.generate`)."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.attention_mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[1]


class _Base(HookedRootModule):
    """Shared plumbing: embeddings, position machinery, input checks, TL glue, tokenizer helpers."""

    cfg: ModelConfig

    def _build_embeddings(self, cfg: ModelConfig) -> None:
        self.runtime = Runtime()
        self.tokenizer: Any = None
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional in ("learned", "sinusoidal"):
            self.pos_embed = PosEmbed(cfg.n_ctx, cfg.d_model, learned=cfg.positional == "learned")
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.n_token_types:
            self.token_type_embed = Embed(cfg.n_token_types, cfg.d_model)
            self.hook_token_type_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.embed_norm:
            self.ln_embed = make_norm(cfg)
        if cfg.positional == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def _finish(self) -> None:
        self.init_weights()
        self.setup()
        self.mod_dict = _HookDict(self.mod_dict)
        self.hook_dict = _HookDict(self.hook_dict)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init: N(0, init_std) for matrices and embeddings, zeros for biases, ones for norms."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.is_meta:  # built for loading (interp.loading): no data to fill, and normal_ on meta imports torch._dynamo (~5 s)
                continue
            last = name.rsplit(".", 1)[-1]
            if last in ("w",) or (last == "weight" and p.ndim == 1):
                nn.init.ones_(p)
            elif last in ("b", "bias", "b_U", "W_rel") or p.ndim == 1:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    # ---------------- input checks ----------------
    def _check_tokens(self, tokens: Any, name: str = "tokens", vocab: int | None = None) -> torch.Tensor:
        if isinstance(tokens, str | list) and self.tokenizer is not None:
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, torch.Tensor):
            raise InterpError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}.")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InterpError(f"{name} must hold integer token ids, got dtype {tokens.dtype}; use tokens.long().")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InterpError(f"{name} must have shape [batch, pos] (or [pos]), got {tuple(tokens.shape)}.")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise InterpError(f"{name} is empty (shape {tuple(tokens.shape)}); pass at least one token.")
        vocab = vocab or self.cfg.d_vocab
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise InterpError(f"{name} contain id {lo if lo < 0 else hi}, outside the vocabulary 0..{vocab - 1}.")
        return tokens.long()

    def _check_length(self, total: int) -> None:
        if self.cfg.positional == "learned" and total > self.cfg.n_ctx:
            raise InterpError(f"Sequence length {total} exceeds n_ctx={self.cfg.n_ctx} of this model's learned positions; truncate the input.")

    def _check_attention_mask(self, attention_mask: Any, shape: tuple[int, int]) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != torch.Size(shape):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise InterpError(f"attention_mask must be a tensor of shape {shape} (1 = token, 0 = padding), got {got}.")
        m = attention_mask.bool()
        return None if bool(m.all()) else m

    # ---------------- embeddings and contexts ----------------
    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = hp(self.hook_embed, self.embed(tokens))  # [batch, pos, d_model]
        if hasattr(self, "pos_embed"):
            pe = self.pos_embed(positions)[None].expand(tokens.shape[0], -1, -1)
            x = x + hp(self.hook_pos_embed, pe)  # [batch, pos, d_model] (batch kept for TL)
        if hasattr(self, "token_type_embed"):
            tt = torch.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + hp(self.hook_token_type_embed, self.token_type_embed(tt))
        if hasattr(self, "ln_embed"):
            x = self.ln_embed(x)
        return x

    def _context(self, *, q_pos: torch.Tensor, k_len: int, mask: MaskSpec, padding: torch.Tensor | None,
                 rel: RelativePositionBias | None, dtype: torch.dtype) -> AttnContext:
        cfg, rt = self.cfg, self.runtime
        penalty = rt.soft_mask_penalty if rt.override_penalty else cfg.soft_mask_penalty
        temperature = rt.temperature if rt.temperature is not None else cfg.attn_temperature
        k_pos = torch.arange(k_len, device=q_pos.device)
        pos_bias = None
        if cfg.positional == "alibi":
            pos_bias = alibi_bias(self.alibi_slopes.float(), q_pos, k_pos)
        elif rel is not None:
            pos_bias = rel(q_pos, k_pos)
        rope = None
        if cfg.positional == "rope":
            rope = rope_cos_sin(q_pos, cfg.rotary_dim, cfg.rope_base, cfg.rope_interleaved, dtype)
        return AttnContext(q_pos=q_pos, k_len=k_len, mask=mask, padding=padding, penalty=penalty,
                           temperature=temperature, pos_bias=pos_bias, rope=rope)

    @property
    def effective_mask(self) -> MaskSpec:
        """The structural mask in effect: an :meth:`override_attention` mask, else ``cfg.mask``."""
        return self.runtime.mask or self.cfg.mask

    # ---------------- run-time overrides used by analyses ----------------
    @contextlib.contextmanager
    def override_attention(self, *, mask: MaskSpec | str | None = None, soft_mask_penalty: float | None | str = "keep",
                           temperature: float | None = None) -> Iterator[None]:
        """Run the same weights under another mask, a soft penalty, or a temperature.

        >>> # with model.override_attention(mask="causal&sliding_window:4"): model(tokens)
        """
        from interp.masks import parse_mask

        if isinstance(mask, str):
            mask = parse_mask(mask)
        if mask is not None and not isinstance(mask, MaskSpec):
            raise InterpError(f"mask must be a MaskSpec or a string such as 'causal&sliding_window:4', got {type(mask).__name__}.")
        if soft_mask_penalty not in ("keep", None) and (isinstance(soft_mask_penalty, bool) or not isinstance(soft_mask_penalty, int | float)
                                                        or math.isnan(soft_mask_penalty) or soft_mask_penalty < 0):
            raise InterpError(f"soft_mask_penalty must be >= 0, got {soft_mask_penalty!r}.")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, int | float)
                                        or not math.isfinite(temperature) or temperature <= 0):
            raise InterpError(f"temperature must be > 0 and finite, got {temperature!r}.")
        if self.cfg.attn_kernel == "linear" and (soft_mask_penalty not in ("keep", None) or temperature not in (None, 1.0)):
            raise InterpError("Linear attention has no softmax, so soft_mask_penalty and temperature do not apply to it.")
        rt = self.runtime
        saved = (rt.mask, rt.soft_mask_penalty, rt.override_penalty, rt.temperature)
        if mask is not None:
            if self.cfg.attn_kernel == "linear" and not (mask.is_causal or mask.is_full):
                raise InterpError("Linear attention supports only causal or bidirectional masks.")
            rt.mask = mask
        if soft_mask_penalty != "keep":
            rt.soft_mask_penalty, rt.override_penalty = soft_mask_penalty, True
        if temperature is not None:
            rt.temperature = temperature
        try:
            yield
        finally:
            rt.mask, rt.soft_mask_penalty, rt.override_penalty, rt.temperature = saved

    def _stack(self, stack: str) -> nn.ModuleList:
        """The ModuleList of blocks named by ``stack`` (a ".cross" suffix names its cross-attention)."""
        blocks = getattr(self, stack.split(".")[0], None) if isinstance(stack, str) else None
        if not isinstance(blocks, nn.ModuleList) or stack.count(".") > 1 or stack.split(".", 1)[1:] not in ([], ["cross"]):
            names = [n for n in ("blocks", "encoder", "decoder") if isinstance(getattr(self, n, None), nn.ModuleList)]
            raise InterpError(f"Unknown stack {stack!r}; this model's stacks: {', '.join(names)}.")
        return blocks

    def set_head_gates(self, gates: torch.Tensor | None, stack: str = "blocks") -> None:
        """Multiply each head's output (``hook_z``) by a gate, [n_layers, n_heads] (Michel et al.
        2019). Gates may require grad: dL/d gate is the head-importance signal. None removes them.
        ``stack`` is "blocks", or "encoder", "decoder", "decoder.cross" (cross-attention heads)."""
        blocks = self._stack(stack)
        if stack.endswith(".cross") and not getattr(blocks[0], "has_cross", False):
            raise InterpError(f"Stack {stack.split('.')[0]!r} has no cross-attention.")
        if gates is None:
            for key in [k for k in self.runtime.head_gates if k[0] == stack]:
                del self.runtime.head_gates[key]
            return
        if gates.shape != (len(blocks), self.cfg.n_heads):
            raise InterpError(f"head gates must have shape ({len(blocks)}, {self.cfg.n_heads}), got {tuple(gates.shape)}.")
        for layer in range(len(blocks)):
            self.runtime.head_gates[(stack, layer)] = gates[layer]

    def set_expert_mask(self, layer: int, mask: torch.Tensor | None, stack: str = "blocks") -> None:
        """Disable experts of one MoE layer (bool [n_experts], True = kept); None restores all."""
        blocks = self._stack(stack)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise InterpError(f"layer must be an integer in 0..{len(blocks) - 1}, got {layer!r}.")
        mlp = getattr(blocks[layer], "mlp", None)
        if not isinstance(mlp, MoE):
            raise InterpError(f"Layer {layer} has no mixture of experts.")
        if mask is not None and (mask.shape != (mlp.n_experts,) or int(mask.sum()) < mlp.k):
            raise InterpError(f"expert mask must be bool [{mlp.n_experts}] keeping at least top_k={mlp.k} experts.")
        mlp.expert_mask = None if mask is None else mask.bool()

    def _cache_is_exact(self, prompt_len: int, total_len: int) -> bool:
        """Whether incremental decoding equals recomputation: no position may see a later
        generated token (a soft penalty, a bidirectional or prefix mask past the prompt would)."""
        penalty = self.runtime.soft_mask_penalty if self.runtime.override_penalty else self.cfg.soft_mask_penalty
        if penalty is not None:
            return False
        mask = self.runtime.mask or self.cfg.mask
        if mask.is_causal:
            return True
        allowed = mask.build(total_len, total_len)  # [q, k]
        return not bool(allowed.triu(1)[:, prompt_len:].any())

    def set_use_attn_result(self, use: bool) -> None:
        """Compute ``hook_result`` (per-head outputs) in every forward, as TransformerLens' flag."""
        self.runtime.use_attn_result = bool(use)

    def moe_losses(self) -> dict[str, torch.Tensor]:
        """The last forward's MoE losses, weighted by the config: ``aux`` (Switch load balancing,
        mean over MoE layers, times ``moe_aux_loss_coef``) and ``z`` (router z-loss times its coef)."""
        moes = [m for m in self.modules() if isinstance(m, MoE) and m.last_losses]
        if not moes:
            zero = torch.zeros((), device=self.embed.W_E.device)
            return {"aux": zero, "z": zero}
        aux = torch.stack([m.last_losses["aux"] for m in moes]).mean() * self.cfg.moe_aux_loss_coef
        z = torch.stack([m.last_losses["z"] for m in moes]).mean() * self.cfg.router_z_loss_coef
        return {"aux": aux, "z": z}

    # ---------------- TransformerLens glue ----------------
    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs: Any) -> tuple[Any, ActivationCache | dict]:
        """As TransformerLens, but returns an ``ActivationCache`` (TL 4.3 returns a plain dict).
        Hook names given as a string or list must exist (TL would silently cache nothing)."""
        names = kwargs.get("names_filter")
        if isinstance(names, str | list | tuple):
            names = [names] if isinstance(names, str) else list(names)
            self.check_hook_names(names)
            kwargs["names_filter"] = names
        if kwargs.get("names_filter") is None and not self.runtime.use_attn_result:
            # hook_result is opt-in as in TransformerLens: caching "everything" skips it
            kwargs["names_filter"] = lambda name: not name.endswith("hook_result")
        with recording():
            out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        _note_recorded_memory(cache)
        if return_cache_object and not isinstance(cache, ActivationCache):
            cache = ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def check_hook_names(self, names: list[str]) -> None:
        """Raise :class:`interp.errors.HookNameError` for the first unknown name."""
        for n in names:
            self.hook_dict[n]

    @property
    def W_U(self) -> torch.Tensor:
        if not hasattr(self, "unembed"):
            raise InterpError("This model has no unembedding (a bare encoder); vocabulary projections need a language-model head.")
        return self.unembed.W_U

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.W_E

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """Unembedding directions [..., d_model] of tokens (TransformerLens' logit_attrs uses it)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        t = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, t].movedim(0, -1)

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    # ---------------- tokenizer helpers ----------------
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InterpError("This model has no tokenizer attached; pass token ids, or load it with interp.load_pretrained.")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  truncate: bool = True) -> torch.Tensor:
        """Text -> token ids [batch, pos]; decoders get BOS prepended when the tokenizer has one
        and does not add it itself, encoders get their special tokens ([CLS] ... [SEP])."""
        tok = self._need_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise InterpError("to_tokens needs a string or a non-empty list of strings.")
        special = self.cfg.architecture != "decoder"
        ids = [tok.encode(t, add_special_tokens=special) for t in texts]
        bos = getattr(tok, "bos_token_id", None)
        if prepend_bos is None:
            prepend_bos = getattr(self, "prepend_bos", self.cfg.default_prepend_bos)
        if self.cfg.architecture == "decoder" and prepend_bos and bos is not None:
            ids = [i if (i and i[0] == bos) else [bos, *i] for i in ids]
        if truncate and self.cfg.positional == "learned":
            ids = [i[: self.cfg.n_ctx] for i in ids]
        if any(len(i) == 0 for i in ids):
            raise InterpError("A text produced no tokens; pass non-empty text.")
        pad = getattr(tok, "pad_token_id", None)
        pad = 0 if pad is None else pad
        width = max(len(i) for i in ids)
        side = padding_side or getattr(tok, "padding_side", "right")
        rows = [([pad] * (width - len(i)) + i) if side == "left" else (i + [pad] * (width - len(i))) for i in ids]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def to_str_tokens(self, text: str | torch.Tensor, prepend_bos: bool | None = None) -> list[str]:
        """One string per token, as the model sees them."""
        tok = self._need_tokenizer()
        ids = self.to_tokens(text, prepend_bos=prepend_bos)[0] if isinstance(text, str) else torch.as_tensor(text).reshape(-1)
        return [tok.decode([int(i)]) for i in ids]

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        tok = self._need_tokenizer()
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [tok.decode(r.tolist()) for r in t]
        return tok.decode(t.tolist())

    def to_single_token(self, string: str) -> int:
        tok = self._need_tokenizer()
        ids = tok.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            raise InterpError(f"{string!r} is {len(ids)} tokens, not one.")
        return ids[0]

    def param_count(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class HookedTransformer(_Base):
    """A decoder-only or encoder-only transformer with TransformerLens hook names.

    >>> import torch, interp
    >>> model = interp.HookedTransformer(interp.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32))
    >>> logits, cache = model.run_with_cache(torch.randint(0, 100, (2, 8)))
    >>> tuple(cache["pattern", 0].shape)
    (2, 4, 8, 8)
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise InterpError(f"HookedTransformer needs an interp.ModelConfig, got {type(cfg).__name__}.")
        if cfg.architecture == "encoder_decoder":
            raise InterpError("architecture='encoder_decoder' is built by interp.HookedEncoderDecoder.")
        self.cfg = cfg
        self._build_embeddings(cfg)
        if cfg.positional == "relative":
            self.rel_bias = RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance,
                                                 bidirectional=not cfg.mask.is_causal)
        self.blocks = nn.ModuleList([
            Block(cfg, stack="blocks", layer=i, runtime=self.runtime, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)
        ])
        if cfg.final_norm and cfg.norm != "none":
            self.ln_final = make_norm(cfg)
        if cfg.has_unembed:
            if cfg.mlm_head:
                self.mlm_head = MLMHead(cfg)
            self.unembed = Unembed(cfg, self.embed if cfg.tie_embeddings else None)
        self._finish()
        self.tokenizer = tokenizer

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_type: ReturnType = "logits", *, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_kv: KVCache | None = None,
                start_at_layer: int | None = None, stop_at_layer: int | None = None,
                residual: torch.Tensor | None = None) -> Any:
        """tokens [batch, pos] -> logits [batch, pos, d_vocab] (or loss, both, hidden, None).

        ``attention_mask`` is the tokenizer's (1 = token, 0 = padding). ``labels`` defaults to
        the next token for decoders (padding ignored); encoders need ``labels`` for a loss
        (-100 = ignored, as in MLM). ``past_kv`` appends to a :class:`KVCache` for generation.
        ``stop_at_layer`` returns the residual stream before that block (for probes); both layer
        arguments take negative indices as TransformerLens (-1 = the last block).
        """
        cfg = self.cfg
        for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not -cfg.n_layers <= value <= cfg.n_layers):
                raise InterpError(f"{name} must be an integer in -{cfg.n_layers}..{cfg.n_layers}, got {value!r}.")
        if start_at_layer is not None and start_at_layer < 0:
            start_at_layer += cfg.n_layers
        if stop_at_layer is not None and stop_at_layer < 0:
            stop_at_layer += cfg.n_layers
        if return_type not in ("logits", "loss", "both", "hidden", None):
            raise InterpError(f"return_type must be 'logits', 'loss', 'both', 'hidden' or None, got {return_type!r}.")
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        if token_type_ids is not None:
            if not hasattr(self, "token_type_embed"):
                raise InterpError("This model has no token types (n_token_types=0); remove token_type_ids.")
            token_type_ids = self._check_tokens(token_type_ids, "token_type_ids", vocab=cfg.n_token_types)
            if token_type_ids.shape != tokens.shape:
                raise InterpError(f"token_type_ids must have the tokens' shape {tuple(tokens.shape)}, got {tuple(token_type_ids.shape)}.")
        past_len = past_kv.seq_len if past_kv is not None else 0
        self._check_length(past_len + T)
        if past_kv is not None:
            if attention_mask is None and past_kv.attention_mask is not None:
                attention_mask = torch.ones(B, T, dtype=torch.long, device=tokens.device)
            if attention_mask is not None:
                full = attention_mask if past_kv.attention_mask is None or past_len == 0 else torch.cat([past_kv.attention_mask, attention_mask], 1)
                past_kv.attention_mask = full
                attention_mask = full
        padding = self._check_attention_mask(attention_mask, (B, past_len + T))
        q_pos = torch.arange(past_len, past_len + T, device=tokens.device)
        mask = self.runtime.mask or cfg.mask
        if start_at_layer is None:
            x = self._embed(tokens, q_pos, token_type_ids)
        else:
            if residual is None:
                raise InterpError("start_at_layer needs residual= (the stream entering that block).")
            x = residual
        ctx = self._context(q_pos=q_pos, k_len=past_len + T, mask=mask, padding=padding,
                            rel=getattr(self, "rel_bias", None), dtype=x.dtype)
        token_mask = None if padding is None else padding[:, past_len:]
        for i, block in enumerate(self.blocks):
            if start_at_layer is not None and i < start_at_layer:
                continue
            if stop_at_layer is not None and i >= stop_at_layer:
                return x
            x = block(x, ctx, past=past_kv.layers[i] if past_kv is not None else None, token_mask=token_mask)
        if stop_at_layer is not None:  # = n_layers: the residual after the last block, before ln_final
            return x
        if hasattr(self, "ln_final"):
            x = self.ln_final(x)
        if return_type is None:
            return None
        if return_type == "hidden":
            return x
        if not hasattr(self, "unembed"):
            raise InterpError("This model has no unembedding (a bare encoder); use return_type='hidden' for its final states.")
        if cfg.logit_scale != 1.0:
            x = x * cfg.logit_scale
        if hasattr(self, "mlm_head"):
            x = self.mlm_head(x)
        logits = self.unembed(x)  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        loss = self.loss(logits, tokens, padding[:, past_len:] if padding is not None else None, labels)
        return loss if return_type == "loss" else (logits, loss)

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        """Mean cross-entropy: next-token for decoders, ``labels`` (-100 ignored) otherwise."""
        if labels is None:
            if self.cfg.architecture != "decoder":
                raise InterpError("An encoder's loss needs labels= (token ids to predict, -100 where ignored).")
            labels = tokens[:, 1:].clone()
            if padding is not None:
                labels[~padding[:, 1:]] = -100
            logits = logits[:, :-1]
        elif not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1] or labels.is_floating_point():
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise InterpError(f"labels must be integer ids of the tokens' shape {tuple(logits.shape[:-1])}, got {got}.")
        elif bool(((labels < 0) & (labels != -100)).any()) or bool((labels >= logits.shape[-1]).any()):
            raise InterpError(f"labels must be ids in 0..{logits.shape[-1] - 1} or -100 (ignored).")
        if labels.numel() == 0:
            raise InterpError("A loss needs at least two tokens per sequence.")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
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

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor | str, max_new_tokens: int = 20, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None, use_cache: bool = True,
                 attention_mask: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor | str:
        """Greedy (temperature 0) or sampled continuation with a KV cache; returns all tokens
        [batch, pos + new] (or a string when given a string). Under a mask that lets a position
        see later tokens (a soft penalty, bidirectional or prefix past the prompt) the cache
        would be stale, so every step is recomputed instead."""
        if self.cfg.architecture != "decoder":
            raise InterpError("generate needs a decoder (a causal language model).")
        as_text = isinstance(tokens, str)
        if as_text:
            tokens = self.to_tokens(tokens)
        tokens = self._check_tokens(tokens)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InterpError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        use_cache = use_cache and self._cache_is_exact(tokens.shape[1], tokens.shape[1] + max_new_tokens)
        cache = KVCache(self.cfg.n_layers) if use_cache else None
        out = tokens
        mask = attention_mask
        logits = self(tokens, attention_mask=mask, past_kv=cache)
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature and temperature > 0:
                last = last / temperature
                if top_k:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1).cpu(), 1, generator=gen).to(last.device)[:, 0]
            else:
                nxt = last.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
            if cache is not None:
                logits = self(nxt[:, None], past_kv=cache)
            else:
                logits = self(out, attention_mask=mask)
        return self.to_string(out[0]) if as_text else out


class HookedEncoderDecoder(_Base):
    """Encoder-decoder with cross-attention (T5, Raffel et al. 2020; Vaswani et al. 2017).

    Stacks ``encoder.{l}`` (bidirectional) and ``decoder.{l}`` (causal, with
    ``decoder.{l}.cross_attn``), final norms ``encoder_final_ln`` and ``ln_final``. The token
    embedding is shared; ``hook_embed`` is the encoder's and ``hook_decoder_embed`` the decoder's
    (likewise ``hook_pos_embed`` / ``hook_decoder_pos_embed`` for absolute positions).
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        if not isinstance(cfg, ModelConfig) or cfg.architecture != "encoder_decoder":
            raise InterpError("HookedEncoderDecoder needs a ModelConfig with architecture='encoder_decoder'.")
        self.cfg = cfg
        self._build_embeddings(cfg)
        self.hook_decoder_embed = HookPoint()  # [batch, pos, d_model]
        if hasattr(self, "pos_embed"):
            self.hook_decoder_pos_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional == "relative":
            self.encoder_rel_bias = RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, True)
            self.decoder_rel_bias = RelativePositionBias(cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, False)
        self.encoder = nn.ModuleList([Block(cfg, stack="encoder", layer=i, runtime=self.runtime) for i in range(cfg.n_layers)])
        self.decoder = nn.ModuleList([
            Block(cfg, stack="decoder", layer=i, runtime=self.runtime, cross=True) for i in range(cfg.n_decoder_layers)
        ])
        if cfg.final_norm and cfg.norm != "none":
            self.encoder_final_ln = make_norm(cfg)
            self.ln_final = make_norm(cfg)
        if cfg.has_unembed:
            self.unembed = Unembed(cfg, self.embed if cfg.tie_embeddings else None)
        self._finish()
        self.tokenizer = tokenizer

    def encode(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states [batch, pos, d_model]."""
        tokens = self._check_tokens(tokens, "input tokens")
        B, T = tokens.shape
        self._check_length(T)
        padding = self._check_attention_mask(attention_mask, (B, T))
        pos = torch.arange(T, device=tokens.device)
        x = self._embed(tokens, pos, None)
        ctx = self._context(q_pos=pos, k_len=T, mask=Bidirectional(), padding=padding,
                            rel=getattr(self, "encoder_rel_bias", None), dtype=x.dtype)
        for block in self.encoder:
            x = block(x, ctx)
        return self.encoder_final_ln(x) if hasattr(self, "encoder_final_ln") else x

    def forward(self, tokens: torch.Tensor, decoder_input: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_type: ReturnType = "logits", *,
                decoder_attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                encoder_output: torch.Tensor | None = None, past_kv: KVCache | None = None) -> Any:
        """(input tokens, decoder input tokens) -> decoder logits [batch, dec_pos, d_vocab].

        With ``labels`` and no ``decoder_input``, the decoder input is the labels shifted right
        after ``cfg.extra['decoder_start_token_id']`` (0 by default), as in T5."""
        cfg = self.cfg
        if return_type not in ("logits", "loss", "both", "hidden", None):
            raise InterpError(f"return_type must be 'logits', 'loss', 'both', 'hidden' or None, got {return_type!r}.")
        if decoder_input is None:
            if labels is None:
                raise InterpError("HookedEncoderDecoder needs decoder_input (or labels to shift right).")
            start = int(cfg.extra.get("decoder_start_token_id", 0))
            decoder_input = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1].clamp(min=0)], 1)
        enc_tokens = self._check_tokens(tokens, "input tokens")
        enc_pad = self._check_attention_mask(attention_mask, tuple(enc_tokens.shape))
        enc = encoder_output if encoder_output is not None else self.encode(enc_tokens, attention_mask)
        dec = self._check_tokens(decoder_input, "decoder_input")
        B, T = dec.shape
        past_len = past_kv.seq_len if past_kv is not None else 0
        self._check_length(past_len + T)
        padding = self._check_attention_mask(decoder_attention_mask, (B, past_len + T)) if past_kv is None else None
        q_pos = torch.arange(past_len, past_len + T, device=dec.device)
        x = hp(self.hook_decoder_embed, self.embed(dec))
        if hasattr(self, "pos_embed"):
            x = x + hp(self.hook_decoder_pos_embed, self.pos_embed(q_pos)[None].expand(B, -1, -1))
        ctx = self._context(q_pos=q_pos, k_len=past_len + T, mask=self.runtime.mask or Causal(), padding=padding,
                            rel=getattr(self, "decoder_rel_bias", None), dtype=x.dtype)
        cross = AttnContext(q_pos=q_pos, k_len=enc.shape[1], mask=Bidirectional(), padding=enc_pad, penalty=None,
                            temperature=ctx.temperature)
        for i, block in enumerate(self.decoder):
            x = block(x, ctx, enc=enc, cross_ctx=cross, past=past_kv.layers[i] if past_kv is not None else None)
        if hasattr(self, "ln_final"):
            x = self.ln_final(x)
        if return_type is None:
            return None
        if return_type == "hidden":
            return x
        if not hasattr(self, "unembed"):
            raise InterpError("This model has no unembedding; use return_type='hidden'.")
        logits = self.unembed(x * cfg.logit_scale if cfg.logit_scale != 1.0 else x)
        if return_type == "logits":
            return logits
        if labels is None:
            labels = dec[:, 1:]
            logits_l = logits[:, :-1]
        else:
            if not isinstance(labels, torch.Tensor) or labels.shape != dec.shape or labels.is_floating_point():
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise InterpError(f"labels must be integer ids of the decoder input's shape {tuple(dec.shape)}, got {got}.")
            if bool(((labels < 0) & (labels != -100)).any()) or bool((labels >= logits.shape[-1]).any()):
                raise InterpError(f"labels must be ids in 0..{logits.shape[-1] - 1} or -100 (ignored).")
            logits_l = logits
        loss = F.cross_entropy(logits_l.reshape(-1, logits_l.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return loss if return_type == "loss" else (logits, loss)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with a decoder KV cache; returns decoder tokens including the start token."""
        enc_tokens = self._check_tokens(tokens, "input tokens")
        enc = self.encode(enc_tokens, attention_mask)
        start = int(self.cfg.extra.get("decoder_start_token_id", 0))
        out = torch.full((enc_tokens.shape[0], 1), start, dtype=torch.long, device=enc_tokens.device)
        # a soft penalty or a non-causal override lets earlier positions see later ones: recompute
        cache = KVCache(self.cfg.n_decoder_layers) if self._cache_is_exact(1, 1 + max_new_tokens) else None
        step = out
        for _ in range(max_new_tokens):
            logits = self(enc_tokens, step if cache is not None else out, attention_mask=attention_mask,
                          encoder_output=enc, past_kv=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            step = nxt
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return out


def build_model(cfg: ModelConfig, tokenizer: Any = None) -> HookedTransformer | HookedEncoderDecoder:
    """The right class for a config."""
    cls = HookedEncoderDecoder if cfg.architecture == "encoder_decoder" else HookedTransformer
    return cls(cfg, tokenizer=tokenizer)
