"""One frozen configuration for every variant the model implements.

Field names follow TransformerLens (``n_layers, d_model, n_heads, d_head, d_mlp, d_vocab,
n_ctx``) so its ``ActivationCache`` helpers read our config unchanged. Every other field is one
documented variant choice; impossible combinations raise ``ValueError`` with a sentence saying
what to change (the checks, one function per concern, are in :mod:`interp.config_checks`).

Derived fields follow their sources. A derived field left unset (``None``) is filled in
``__post_init__`` from its source, and stays derived through :func:`dataclasses.replace`::

    d_head = d_model // n_heads     d_mlp = 4 * d_model        n_kv_heads = n_heads
    d_vocab_out = d_vocab           rotary_dim = d_head (RoPE)  n_decoder_layers = n_layers
    d_expert = d_mlp (MoE)          d_shared_expert = d_expert  moe_layers = all layers (MoE)
    default_prepend_bos = (architecture == "decoder")
    mask = causal, or bidirectional for architecture="encoder"

so ``replace(cfg, d_model=128, n_heads=4).d_head == 32``, while a field the user set keeps its
value. ``dataclasses.replace`` hands ``__init__`` every old value, so the config records (in
the private field ``_derived``) which fields it derived and to what; an incoming value equal
to the recorded one means "still derived". The one ambiguous case: passing to
``dataclasses.replace`` the very value a field had derived to (``replace(cfg, d_model=128,
d_head=16)`` where 16 was derived) re-derives it. :meth:`ModelConfig.replace` knows exactly
which fields were passed and is the exact form: ``cfg.replace(d_model=128, d_head=16).d_head
== 16``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from interp import config_variants
from interp.config_checks import (
    MAX_MODULES,
    REQUIRED_SIZES,
    check_architecture,
    check_attention_kernel,
    check_choices,
    check_flags,
    check_mask_parameters,
    check_memory,
    check_moe,
    check_norms,
    check_numbers,
    check_positions,
    check_required_sizes,
    check_unembedding,
    check_widths,
)
from interp.config_tl import TLConfigNames
from interp.masks import Bidirectional, Causal, MaskSpec, mask_from_dict, mask_to_dict, parse_mask
from interp.rope_scaling import RopeScaling

Architecture = Literal["decoder", "encoder", "encoder_decoder"]
Positional = Literal["none", "sinusoidal", "learned", "rope", "alibi", "relative"]
Norm = Literal["layernorm", "rmsnorm", "none"]
NormPlacement = Literal["pre", "post", "sandwich", "post_branch"]
Act = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "geglu_tanh", "reglu"]
AttnKernel = Literal["auto", "eager", "sdpa", "linear"]
Router = Literal["softmax_topk", "topk_softmax"]
QKNorm = Literal["none", "full", "head"]
FeatureMap = Literal["elu", "relu"]

GATED_ACTS = ("swiglu", "geglu", "geglu_tanh", "reglu")

#: every Literal field and its valid values, in the order they are checked
CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(tp) for name, tp in (
        ("architecture", Architecture), ("positional", Positional), ("norm", Norm),
        ("norm_placement", NormPlacement), ("act", Act), ("attn_kernel", AttnKernel),
        ("router", Router), ("qk_norm", QKNorm), ("linear_feature_map", FeatureMap),
    )
}


class ReadOnlyDict(dict):
    """``cfg.extra`` after construction: a dict that refuses every change.

    A dict subclass (not ``types.MappingProxyType``) so that ``copy.deepcopy``, pickling,
    ``json.dumps`` and ``isinstance(x, dict)`` keep working. Only the top level is frozen;
    keep the values plain JSON data. To add a key, build a new config:
    ``cfg.replace(extra={**cfg.extra, "key": value})``.
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "ModelConfig.extra is read-only after construction; pass extra={...} when building "
            "the config, or cfg.replace(extra={**cfg.extra, key: value})."
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReadOnlyDict, (dict(self),))


# --- derivations: field -> its value from the fields it follows (None: does not apply) ---


def _d_head(c: ModelConfig) -> int:
    if c.d_model % c.n_heads:
        raise ValueError(
            f"d_model={c.d_model} is not divisible by n_heads={c.n_heads}; "
            "choose a divisible pair or set d_head explicitly."
        )
    return c.d_model // c.n_heads


def _has_experts(c: ModelConfig) -> bool:
    return isinstance(c.n_experts, int) and c.n_experts > 0


def _moe_layers(c: ModelConfig) -> tuple[int, ...] | None:
    n_stack = c.n_decoder_layers if c.architecture == "encoder_decoder" else c.n_layers
    if (not _has_experts(c) or isinstance(n_stack, bool) or not isinstance(n_stack, int)
            or n_stack > MAX_MODULES):
        return None  # a bad n_decoder_layers is reported by check_architecture
    return tuple(range(n_stack))


#: in dependency order: a derivation reads only required sizes and fields listed above it
DERIVATIONS: tuple[tuple[str, Callable[[ModelConfig], Any]], ...] = (
    ("d_head", _d_head),
    ("d_mlp", lambda c: 4 * c.d_model),
    ("n_kv_heads", lambda c: c.n_heads),
    ("d_vocab_out", lambda c: c.d_vocab),
    ("n_decoder_layers", lambda c: c.n_layers if c.architecture == "encoder_decoder" else None),
    ("mask", lambda c: Bidirectional() if c.architecture == "encoder" else Causal()),
    ("rotary_dim", lambda c: c.d_head if c.positional == "rope" else None),
    ("d_expert", lambda c: c.d_mlp if _has_experts(c) else None),
    ("d_shared_expert", lambda c: c.d_expert if _has_experts(c) else None),
    ("moe_layers", _moe_layers),
    ("default_prepend_bos", lambda c: c.architecture == "decoder"),
)
DERIVED_FIELDS = tuple(name for name, _ in DERIVATIONS)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (``True`` is not the derived ``1``); odd ``==`` is False."""
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # e.g. an array's elementwise ==
        return False


def _check_record(record: Any) -> None:
    """``_derived`` is what an earlier config derived: ((field, value), ...) pairs."""
    ok = isinstance(record, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and p[0] in DERIVED_FIELDS for p in record
    )
    if not ok:
        raise ValueError(
            "_derived is ModelConfig's private record of its derived fields (kept by "
            f"dataclasses.replace); do not pass it, got {record!r}."
        )


def _as_mask(mask: Any) -> MaskSpec:
    """A mask field as given (a MaskSpec, a string such as 'causal', or a serialised dict)."""
    if isinstance(mask, MaskSpec):
        return mask
    if isinstance(mask, str | dict):
        try:
            return parse_mask(mask) if isinstance(mask, str) else mask_from_dict(mask)
        except RecursionError:  # a crafted config: {"op": "not", "a": {"op": "not", ...}}
            raise ValueError(
                "mask is nested too deeply to read (masks combine a handful of predicates); "
                "simplify it."
            ) from None
    raise ValueError(
        f"mask must be a MaskSpec or a string such as 'causal', got {type(mask).__name__}."
    )


def _as_extra(extra: Any) -> ReadOnlyDict:
    if not isinstance(extra, Mapping):
        raise ValueError(
            f"extra must be a dict (free-form provenance), got {type(extra).__name__}."
        )
    return extra if isinstance(extra, ReadOnlyDict) else ReadOnlyDict(extra)


@dataclass(frozen=True)
class ModelConfig(TLConfigNames):
    """Every architectural choice of a :class:`interp.HookedTransformer`.

    Derived fields (``None`` = derive; see the module docstring) follow their sources through
    :func:`dataclasses.replace`; :meth:`replace` is the exact form.

    >>> cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
    >>> (cfg.d_head, cfg.d_mlp, cfg.n_kv_heads, str(cfg.mask))
    (16, 256, 4, 'causal')
    >>> dataclasses.replace(cfg, d_model=128).d_head
    32
    """

    # --- sizes (TransformerLens names) ---
    n_layers: int  # blocks in the stack (the encoder's, for encoder-decoder)
    d_model: int  # residual stream width
    n_heads: int  # query heads per layer
    d_vocab: int  # vocabulary size (embedding and unembedding rows)
    n_ctx: int  # longest sequence; a hard limit only for learned positions
    d_head: int | None = None  # per-head width; default d_model // n_heads
    d_mlp: int | None = None  # FFN hidden width; default 4 * d_model
    # key/value heads: = n_heads MHA, 1 MQA, between GQA (Ainslie et al. 2023)
    n_kv_heads: int | None = None
    d_vocab_out: int | None = None  # unembedding width if it differs from d_vocab

    # --- architecture ---
    architecture: Architecture = "decoder"
    n_decoder_layers: int | None = None  # encoder-decoder only; default n_layers
    attn_only: bool = False  # no FFN at all (the induction-head toy models of Olsson et al. 2022)
    parallel_attn_mlp: bool = False  # x + attn(ln1 x) + mlp(ln2 x) (GPT-J / GPT-NeoX)
    tie_embeddings: bool = False  # unembedding = embedding transposed
    has_unembed: bool = True  # False for bare encoders such as sentence-transformers' MiniLM
    mlm_head: bool = False  # BERT's dense + act + LayerNorm transform before the unembedding
    n_token_types: int = 0  # BERT segment embeddings (0 = none)
    # multiply the final residual before unembedding (T5 tied: d_model**-0.5)
    logit_scale: float = 1.0

    # --- positions ---
    positional: Positional = "learned"
    # RoPE: leading dims of each head rotated; default d_head (partial: NeoX)
    rotary_dim: int | None = None
    rope_base: float = 10000.0
    rope_interleaved: bool = False  # GPT-J pairs (0,1),(2,3) instead of NeoX/Llama halves
    relative_buckets: int = 32  # T5 relative attention bias buckets
    relative_max_distance: int = 128

    # --- normalisation ---
    norm: Norm = "layernorm"
    norm_placement: NormPlacement = "pre"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT)
    final_norm: bool = True  # ln_final before the unembedding (pre-norm models)
    norm_bias: bool = True  # LayerNorm has a bias (T5 and RMSNorm never do)
    # RMSNorm on q and k: over the whole projection (OLMoE) or per head (Qwen3)
    qk_norm: QKNorm = "none"

    # --- FFN ---
    act: Act = "gelu"

    # --- attention ---
    mask: MaskSpec | str | None = None  # default: causal for decoders, bidirectional for encoders
    attn_kernel: AttnKernel = "auto"
    # linear attention phi (Katharopoulos et al. 2020: elu + 1)
    linear_feature_map: FeatureMap = "elu"
    attn_scale: float | None = None  # default 1 / sqrt(d_head); T5 uses 1.0
    soft_mask_penalty: float | None = None  # finite additive penalty instead of -inf on masked keys
    attn_temperature: float = 1.0  # softmax(scores / T)
    attn_qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = False

    # --- per-layer attention and the 2026 variants (interp.config_variants) ---
    # each layer's attention: "global" (the mask) or "sliding" (mask & sliding_window); None:
    # every layer global. Gemma 2 alternates, Gemma 3 is 5 sliding : 1 global
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None  # keys with q - k < sliding_window, on "sliding" layers
    rope_local_base: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3)
    # RoPE context extension (linear, dynamic, yarn, llama3, longrope); a dict is converted
    rope_scaling: RopeScaling | None = None
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(d_model))

    # --- learned masks (interp.components.learned_masks; checked in interp.config_variants) ---
    adaptive_span: bool = False  # a learned span per head (Sukhbaatar et al. 2019)
    span_ramp: int = 32  # R, the width of the span mask's linear ramp, in positions
    l0_head_gates: bool = False  # hard-concrete head gates (Louizos et al. 2018; Voita et al. 2019)
    selective_attention: bool = False  # head 0 hides earlier tokens (Leviathan et al. 2024)

    # --- mixture of experts ---
    n_experts: int = 0  # 0 = dense FFN everywhere
    experts_per_token: int = 2  # top-k
    n_shared_experts: int = 0  # always-on experts (Qwen2-MoE, DeepSeekMoE)
    d_expert: int | None = None  # expert hidden width; default d_mlp
    d_shared_expert: int | None = None  # shared expert hidden width; default d_expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    moe_layers: tuple[int, ...] | None = None  # which layers are MoE; default all
    # Mixtral/OLMoE: softmax then top-k; Switch-style: top-k then softmax
    router: Router = "softmax_topk"
    router_renormalize: bool = True  # renormalise the top-k weights to sum to 1
    # Switch load balancing alpha * N * sum f_i P_i (Fedus et al. 2021)
    moe_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss (Zoph et al. 2022)

    # --- memory-augmented attention (interp.components.memory; checked in check_memory) ---
    # "persistent": learned key-value slots (Sukhbaatar et al. 2019); "knn": a store of past
    # keys and values, top-k retrieval and a learned gate (Wu et al. 2022); "xl": previous
    # segments' states as memory, older ones compressed (Dai et al. 2019; Rae et al. 2020)
    memory_kind: Literal["persistent", "knn", "xl"] | None = None
    memory_layers: tuple[int, ...] | None = None  # layers with memory; None: every layer
    n_memory_slots: int = 16  # persistent: learned slots per layer
    memory_topk: int = 8  # knn: entries retrieved per query and head
    memory_size: int = 4096  # knn: entries kept per layer (oldest dropped first)
    mem_len: int = 32  # xl: past states kept uncompressed
    cmem_len: int = 0  # xl: compressed states kept (0: no compressive memory)
    cmem_rate: int = 2  # xl: states mean-pooled into one compressed state
    # knn: search and score the store by cosine (q, k L2-normalised per head, times a learned
    # per-head scale), Wu et al. 2022's normalised keys: no query-independent key bias
    memory_qk_norm: bool = False
    # knn: the retrieved entries join the context's keys in one softmax (Focused Transformer,
    # Tworkowski et al. 2023) instead of the per-head gate mixing two attentions
    memory_joint: bool = False

    # --- tokenization ---
    # TransformerLens' name: whether to_tokens puts BOS first. Default: decoders yes, others no;
    # loaders set it from the checkpoint's tokenizer (see interp.tokenize.tokenizer_adds_bos)
    default_prepend_bos: bool | None = None

    # --- misc ---
    init_std: float = 0.02
    # --- TransformerLens' opt-in hook points (off by default, as in TL; a hook registered on
    # one fires whatever the flag). Flip them on a model with model.set_use_*(bool).
    use_attn_result: bool = False  # attn.hook_result: per-head outputs before the sum
    use_split_qkv_input: bool = False  # hook_q/k/v_input: one residual copy per (KV) head
    use_attn_in: bool = False  # hook_attn_in: one residual copy per head for q, k and v
    use_hook_mlp_in: bool = False  # hook_mlp_in: the residual entering the MLP's norm
    use_hook_tokens: bool = False  # hook_tokens: the token ids entering the embedding
    # free-form provenance (loader, source, task); read-only after construction
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # private: which fields were derived, and to what (see the module docstring)
    _derived: tuple[tuple[str, Any], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        """Derive what was left unset, normalise, then validate one concern at a time."""
        _check_record(self._derived)
        self._forget_derivations()
        check_required_sizes(self)
        self._derive()
        check_widths(self)
        check_choices(self, CHOICES)
        check_flags(self)
        check_numbers(self)
        self._set("extra", _as_extra(self.extra))
        self._set("mask", _as_mask(self.mask))
        config_variants.normalise_variants(self)
        for check in (check_mask_parameters, check_architecture, check_positions, check_norms,
                      check_attention_kernel, check_moe, check_unembedding):
            check(self)
        config_variants.check_variants(self)
        if self.memory_layers is not None:
            self._set("memory_layers", tuple(sorted(set(self.memory_layers))))
        check_memory(self)
        if self.moe_layers is not None:
            self._set("moe_layers", tuple(sorted(set(self.moe_layers))))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # the dataclass is frozen for everyone else

    def _forget_derivations(self) -> None:
        """A field still holding the value an earlier config derived for it is unset again
        (``dataclasses.replace`` copied it; it did not come from the user)."""
        for name, value in self._derived:
            if _same(getattr(self, name), value):
                self._set(name, None)

    def _derive(self) -> None:
        """Fill every unset derived field from its sources, and record what was derived."""
        record = []
        for name, derive in DERIVATIONS:
            if getattr(self, name) is None and (value := derive(self)) is not None:
                self._set(name, value)
                record.append((name, value))
        self._set("_derived", tuple(record))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes``; the exact form of :func:`dataclasses.replace`.

        Fields named in ``changes`` are explicit, whatever their value; derived fields not
        named are derived afresh; fields the user set stay.

        >>> cfg = ModelConfig(n_layers=1, d_model=64, n_heads=4, d_vocab=10, n_ctx=8)
        >>> cfg.replace(d_model=128, d_head=16).d_head, cfg.replace(d_model=128).d_head
        (16, 32)
        """
        if "_derived" in changes:
            raise TypeError("_derived is private to ModelConfig; it cannot be replaced.")
        derived = {name for name, _ in self._derived} | set(changes) | {"_derived"}
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in derived}
        return type(self)(**kept, **changes)

    # --- TransformerLens compatibility ---
    @property
    def normalization_type(self) -> str | None:
        """TransformerLens' name for our norm ("LN", "RMS" or None), read by ActivationCache;
        "LNPre" / "RMSPre" once ``fold_ln`` moved the norms' weights into their readers."""
        name = {"layernorm": "LN", "rmsnorm": "RMS", "none": None}[self.norm]
        return name and name + ("Pre" if self.layer_norm_folding else "")

    @property
    def is_gated(self) -> bool:
        return self.act in GATED_ACTS

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def device(self) -> str | None:  # some TransformerLens helpers look for cfg.device
        return self.extra.get("device")  # recorded by the model on .to(); None: the default

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.n_experts) and layer in (self.moe_layers or ())

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether ``layer`` attends within ``sliding_window`` (its ``layer_types`` entry)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding"

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every public field, derived ones too (:meth:`from_dict` inverts)."""
        d = {name: getattr(self, name) for name in _public_fields()}
        d["mask"] = mask_to_dict(self.mask)
        d["extra"] = {k: v for k, v in self.extra.items() if k not in ("dtype", "device")}
        if d["moe_layers"] is not None:
            d["moe_layers"] = list(d["moe_layers"])
        if d["layer_types"] is not None:
            d["layer_types"] = list(d["layer_types"])
        if d["memory_layers"] is not None:
            d["memory_layers"] = list(d["memory_layers"])
        if d["rope_scaling"] is not None:
            d["rope_scaling"] = d["rope_scaling"].to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict (a JSON config file or a checkpoint); unknown keys are an error.

        A dict holds values, not intent: a derived field whose value equals what it derives to
        from the dict's other fields counts as derived (as if it were left unset), so a config
        read back from :meth:`to_dict` still follows its sources under ``replace``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"A model config must be a JSON object, got {type(d).__name__}.")
        names = _public_fields()
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(
                f"Unknown config field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(names))}."
            )
        missing = [n for n in REQUIRED_SIZES if n not in d]
        if missing:
            raise ValueError(f"Config is missing required field(s): {', '.join(missing)}.")
        d = dict(d)
        if isinstance(d.get("moe_layers"), list):
            d["moe_layers"] = tuple(d["moe_layers"])
        if isinstance(d.get("mask"), str | dict):
            d["mask"] = _as_mask(d["mask"])
        cfg = cls(**d)
        return cls(**d, _derived=cfg._derived + _given_as_derived(cfg, d))


def _public_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if not f.name.startswith("_"))


def _given_as_derived(cfg: ModelConfig, given: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The derived fields ``given`` set to exactly what they derive to in ``cfg``."""
    out = []
    for name, derive in DERIVATIONS:
        if given.get(name) is None:
            continue
        try:
            value = derive(cfg)
        except ValueError:  # d_head given because d_model is not divisible by n_heads
            continue
        if _same(value, given[name]):
            out.append((name, value))
    return tuple(out)
