"""Token and position embeddings in, logits out: Embed, PosEmbed, Unembed, and BERT's MLM head.

``W_E`` [d_vocab, d_model], ``W_pos`` [n_ctx, d_model] and ``W_U`` [d_model, d_vocab] carry
TransformerLens' names; a tied unembedding is a view of ``W_E`` (one storage, counted once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.components.mlp import ACT_FNS
from interp.components.norms import LayerNorm
from interp.config import ModelConfig
from interp.hooks import hp
from interp.perf.kernels import Linear, linear
from interp.positions import sinusoidal_table


class Embed(nn.Module):
    """Token ids -> vectors, ``W_E`` [d_vocab, d_model] (also the token-type embedding); times
    ``scale`` where the model scales its embeddings (Gemma: sqrt(d_model), rounded to the
    weights' dtype first, as Gemma's reference does)."""

    def __init__(self, d_vocab: int, d_model: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))  # [d_vocab, d_model]

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d"]:
        x = F.embedding(tokens, self.W_E)
        if self.scale != 1.0:
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


class PosEmbed(nn.Module):
    """Learned (a parameter) or sinusoidal (a fixed buffer) absolute positions, ``W_pos``
    [n_ctx, d_model]. Sinusoidal positions past ``n_ctx`` are computed on the fly."""

    def __init__(self, n_ctx: int, d_model: int, learned: bool):
        super().__init__()
        self.learned, self.n_ctx, self.d_model = learned, n_ctx, d_model
        if learned:
            self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))
        for name, table in self.computed_buffers().items():
            self.register_buffer(name, table, persistent=False)

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers that are a function of the constructor's arguments, not weights.

        Loading builds the model on the meta device and fills these from here afterwards
        (:func:`interp.loading._common.assemble`), so they are defined once."""
        return {} if self.learned else {"W_pos": sinusoidal_table(self.n_ctx, self.d_model)}

    def forward(self, positions: Int[torch.Tensor, " pos"]) -> Float[torch.Tensor, "pos d_model"]:
        if not self.learned and int(positions.max()) >= self.W_pos.shape[0]:
            n, d = int(positions.max()) + 1, self.W_pos.shape[1]
            return sinusoidal_table(n, d, self.W_pos.device, self.W_pos.dtype)[positions]
        return self.W_pos[positions]


class Unembed(nn.Module):
    """Residual -> logits. ``W_U`` [d_model, d_vocab] is a view of ``weight`` (or of W_E, tied)."""

    def __init__(self, cfg: ModelConfig, tied_to: Embed | None):
        super().__init__()
        # a list, so the tied embedding is not registered a second time as a submodule
        self._tied = [tied_to] if tied_to is not None else None
        self.softcap = cfg.final_softcap  # logits -> cap * tanh(logits / cap) (Gemma 2)
        if self.softcap is not None:
            self.hook_logits_precap = HookPoint()  # [batch, pos, d_vocab]
            self.hook_logits = HookPoint()  # [batch, pos, d_vocab], capped
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(cfg.d_vocab_out, cfg.d_model))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out)) if cfg.unembed_bias else None

    @property
    def _weight(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self._tied[0].W_E if self._tied else self.weight

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self._weight.T

    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        logits = linear(x, self._weight, self.b_U)
        if self.softcap is None:
            return logits
        logits = hp(self.hook_logits_precap, logits)
        return hp(self.hook_logits, torch.tanh(logits / self.softcap) * self.softcap)


class MLMHead(nn.Module):
    """BERT's prediction-head transform: dense, activation, LayerNorm (Devlin et al. 2019)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.d_model)
        self.act = ACT_FNS[cfg.act if not cfg.is_gated else "gelu"]
        self.ln = LayerNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        return self.ln(self.act(self.dense(x)))
