"""TransformerLens' names for what :class:`interp.ModelConfig` knows, as read-only properties.

TransformerLens' own analysis code (``ActivationCache``, ``head_detector``, ``SVDInterpreter``,
``utils``, ``patching``) reads ``model.cfg.<name>`` with TL's field names and meanings. Our
config keeps its own names (one typed choice per variant); this mixin answers TL's questions
from them, so TL code runs unchanged on an interp model. Nothing here is stored: each property
is a function of the config's fields and of ``cfg.extra`` (provenance the loaders and the model
record: the source, ``dtype`` / ``device`` after ``model.to``, weight processing).

Read by TL 4.3's analysis code: ``n_layers, n_heads, d_head, d_model, d_mlp, d_vocab, n_ctx,
attn_only`` (our fields), ``device, dtype, default_prepend_bos, tokenizer_prepends_bos,
n_key_value_heads, normalization_type, n_devices`` (properties, here or on ModelConfig).
The rest mirror TL's config so that code written against it finds them. One field differs in
meaning and keeps ours: ``attn_scale`` is our multiplier (1/sqrt(d_head)); TL's is the divisor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: our FFN activation -> TL's ``act_fn`` (gated variants: the gate's activation; TL's
#: ``gated_mlp`` says it is gated)
TL_ACT_FN = {
    "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "swiglu": "silu",
    "geglu": "gelu", "geglu_tanh": "gelu_new", "reglu": "relu",
}

#: our positional choice -> TL's ``positional_embedding_type`` (an absolute table added to the
#: residual, learned or sinusoidal, is TL's "standard")
TL_POSITIONAL = {
    "learned": "standard", "sinusoidal": "standard", "rope": "rotary", "alibi": "alibi",
    "relative": "relative_positional_bias", "none": "none",
}

#: Hugging Face model_type -> the architecture class TL records (``original_architecture``)
HF_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "t5": "T5ForConditionalGeneration",
}


class TLConfigNames:
    """Mixin for :class:`interp.ModelConfig`: TransformerLens' config names, read-only."""

    # the dataclass fields this mixin reads (declared for type checkers only)
    extra: Any
    act: str
    positional: str
    norm: str
    n_heads: int
    n_kv_heads: int
    n_layers: int
    d_model: int
    d_head: int
    d_mlp: int
    attn_only: bool
    n_experts: int
    mask: Any
    mlm_head: bool
    architecture: str
    norm_eps: float
    rope_base: float
    rope_interleaved: bool
    embed_norm: bool
    is_gated: bool

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (recorded by the model on ``.to()``; float32 when built)."""
        name = self.extra.get("dtype")
        dt = getattr(torch, str(name).removeprefix("torch."), None) if name else None
        return dt if isinstance(dt, torch.dtype) else torch.float32

    @property
    def n_devices(self) -> int:
        """Devices the layers are spread over: always 1 (interp does not split models)."""
        return 1

    @property
    def n_key_value_heads(self) -> int | None:
        """TL: the key/value heads of grouped-query attention, None for plain multi-head."""
        return self.n_kv_heads if self.n_kv_heads != self.n_heads else None

    @property
    def act_fn(self) -> str:
        """TL's activation name (``gelu_new`` is the tanh approximation)."""
        return TL_ACT_FN[self.act]

    @property
    def gated_mlp(self) -> bool:
        """Whether the FFN is gated (SwiGLU, GeGLU, ReGLU): TL then has ``W_gate``."""
        return self.is_gated

    @property
    def positional_embedding_type(self) -> str:
        return TL_POSITIONAL[self.positional]

    @property
    def rotary_base(self) -> float:
        return self.rope_base

    @property
    def rotary_adjacent_pairs(self) -> bool:
        """TL's name for GPT-J's interleaved rotary pairs."""
        return self.rope_interleaved

    @property
    def eps(self) -> float:
        """The norms' epsilon."""
        return self.norm_eps

    @property
    def uses_rms_norm(self) -> bool:
        return self.norm == "rmsnorm"

    @property
    def final_rms(self) -> bool:
        """Whether the final norm (before the unembedding) is an RMSNorm; ours is always of
        the blocks' kind, so this is true exactly for RMSNorm models (as TL's Llama configs)."""
        return self.norm == "rmsnorm"

    @property
    def post_embedding_ln(self) -> bool:
        """A norm on the embeddings (BERT)."""
        return self.embed_norm

    @property
    def layer_norm_folding(self) -> bool:
        """Whether ``fold_ln`` weight processing was applied (:mod:`interp.processing`)."""
        return bool(self.weight_processing.get("fold_ln", False))

    @property
    def weight_processing(self) -> dict[str, bool]:
        """The weight processing applied at load (empty: raw weights)."""
        return dict(self.extra.get("weight_processing") or {})

    @property
    def num_experts(self) -> int | None:
        """TL: experts per MoE layer, None for a dense FFN."""
        return self.n_experts or None

    @property
    def tokenizer_prepends_bos(self) -> bool | None:
        """Whether the tokenizer adds BOS itself, as recorded at load (None: unknown, no
        tokenizer recorded)."""
        value = self.extra.get("tokenizer_prepends_bos")
        return None if value is None else bool(value)

    @property
    def original_architecture(self) -> str | None:
        """The Hugging Face architecture class of the checkpoint (None: not loaded from one)."""
        if "original_architecture" in self.extra:
            return str(self.extra["original_architecture"])
        model_type = self.extra.get("hf_model_type")
        if model_type == "bert":
            return "BertForMaskedLM" if self.mlm_head else "BertModel"
        return HF_ARCHITECTURES.get(model_type) if model_type else None

    @property
    def model_name(self) -> str:
        """The built-in name, else the checkpoint's file or folder name, else ``"custom"``."""
        for key in ("builtin", "model_name"):
            if self.extra.get(key):
                return str(self.extra[key])
        source = self.extra.get("source")
        return Path(str(source)).name if source else "custom"

    @property
    def n_params(self) -> int:
        """TL's count: the attention and FFN weight matrices only (no embeddings, biases or
        norms). GQA counts its real (fewer) key and value weights; MoE counts every expert
        and its router row, as TL."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        total = self.n_layers * attn
        if not self.attn_only:
            mlp = self.d_model * self.d_mlp * (3 if self.is_gated else 2)
            if self.n_experts:
                mlp = (mlp + self.d_model) * self.n_experts
            total += self.n_layers * mlp
        return total

    @property
    def _window(self) -> int | None:
        """The sliding window of the mask, if it has one (searched through & and |)."""
        stack = [self.mask]
        while stack:
            m = stack.pop()
            if hasattr(m, "window"):
                return int(m.window)
            stack.extend(x for x in (getattr(m, "a", None), getattr(m, "b", None)) if x)
        return None

    @property
    def use_local_attn(self) -> bool:
        """Whether attention is local (a sliding-window mask)."""
        return self._window is not None

    @property
    def window_size(self) -> int | None:
        return self._window

    @property
    def attn_types(self) -> list[str] | None:
        """TL: per layer "global" or "local", only for models with local attention."""
        return ["local"] * self.n_layers if self.use_local_attn else None
