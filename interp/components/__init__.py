"""The model's parts, one job per module:

- :mod:`.context` -- :class:`AttnContext`, the positions, masks and score biases of one forward;
- :mod:`.norms` -- LayerNorm, RMSNorm and the norm registry :func:`make_norm`;
- :mod:`.attention` -- :class:`Attention` (MHA / GQA / MQA, eager / SDPA / linear kernels) and
  :class:`LayerKV`, one layer's keys and values for incremental decoding;
- :mod:`.mlp` -- the dense FFN and the activation registry :data:`ACT_FNS`;
- :mod:`.moe` -- the mixture-of-experts FFN;
- :mod:`.embeddings` -- token and position embeddings, the unembedding, BERT's MLM head;
- :mod:`.block` -- the residual block that assembles them.

Every activation passes a declared ``HookPoint`` (shapes in comments, TransformerLens dimension
names) through :func:`interp.hooks.hp`, which calls a hook point only when something is
registered on it. Weights live in the layout the fast path wants (one fused q/k/v projection,
fused gate/up for gated FFNs); TransformerLens per-head views (``W_Q`` [head, d_model, d_head],
``W_O`` [head, d_head, d_model], ``W_in`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model]) are
properties over the same storage: no copy, no cost in the forward.
"""

from interp.components.attention import Attention, LayerKV
from interp.components.block import Block
from interp.components.context import AttnContext
from interp.components.embeddings import Embed, MLMHead, PosEmbed, Unembed
from interp.components.mlp import ACT_FNS, MLP
from interp.components.moe import MoE
from interp.components.norms import LayerNorm, RMSNorm, apply_norm, make_norm
from interp.hooks import hp, is_hooked

__all__ = [
    "ACT_FNS",
    "MLP",
    "Attention",
    "AttnContext",
    "Block",
    "Embed",
    "LayerKV",
    "LayerNorm",
    "MLMHead",
    "MoE",
    "PosEmbed",
    "RMSNorm",
    "Unembed",
    "apply_norm",
    "hp",
    "is_hooked",
    "make_norm",
]
