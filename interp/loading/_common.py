"""Shared machinery of the loaders: a read-once tensor view, config access, model assembly.

A converter reads a checkpoint through :class:`Tensors`, which records every tensor it takes
and checks every shape, so "every checkpoint tensor is used, every shape is checked, and a
mismatch names the tensor" (STYLE.md, habit 6) is enforced in one place rather than per family.
Models are built with their parameters on the ``meta`` device and the converted tensors are
assigned into them, so loading never holds a randomly initialised copy beside the real weights.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.config import ModelConfig
from interp.errors import InterpError
from interp.tokenize import tokenizer_adds_bos


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


class Tensors:
    """A read-once view over a checkpoint's tensors (a dict or a lazy mapping).

    ``take(name, shape)`` returns the tensor and marks it used; a missing name or a wrong shape
    is an :class:`InterpError` naming the tensor. ``finish()`` raises if any tensor was never
    taken (an unexpected tensor: the config and the checkpoint disagree). ``prefix`` is
    prepended to every name (``"model."`` for a ``*ForCausalLM`` checkpoint).
    """

    def __init__(self, tensors: Mapping[str, Any], prefix: str = "", ignore: tuple[str, ...] = ()):
        self._t = tensors
        self.prefix = prefix
        self._keys = set(tensors.keys())
        self._used: set[str] = set()
        # tensors that are derived buffers, not weights (e.g. rotary inv_freq, GPT-2's causal mask)
        self._ignored = {k for k in self._keys if any(k.endswith(s) for s in ignore)}

    def full(self, name: str, absolute: bool = False) -> str:
        return name if absolute else self.prefix + name

    def has(self, name: str, absolute: bool = False) -> bool:
        return self.full(name, absolute) in self._keys

    def take(self, name: str, shape: tuple[int, ...] | None = None,
             absolute: bool = False) -> torch.Tensor:
        """The tensor ``prefix + name`` (``name`` itself when ``absolute``), shape-checked."""
        key = self.full(name, absolute)
        if key not in self._keys:
            want = f" (expected shape {list(shape)})" if shape is not None else ""
            raise InterpError(f"Checkpoint is missing tensor {key!r}{want}; the file does not "
                              "match its config.")
        t = self._t[key]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if shape is not None and _shape(t) != tuple(shape):
            raise InterpError(f"Checkpoint tensor {key!r} has shape {list(t.shape)}, expected "
                              f"{list(shape)} from the config.")
        if not t.is_floating_point():  # a converter would cast (or fuse) it into a float weight
            raise InterpError(f"Checkpoint tensor {key!r} has dtype {t.dtype}; weights are "
                              "floating point (the file is corrupt or not this model's).")
        self._used.add(key)
        return t

    def take_opt(self, name: str, shape: tuple[int, ...] | None = None,
                 absolute: bool = False) -> torch.Tensor | None:
        return self.take(name, shape, absolute) if self.has(name, absolute) else None

    def skip(self, name: str, absolute: bool = False) -> None:
        """Mark a tensor as deliberately unused (a tied copy of another tensor)."""
        if self.has(name, absolute):
            self._used.add(self.full(name, absolute))

    def finish(self) -> None:
        extra = sorted(self._keys - self._used - self._ignored)
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            names = ", ".join(repr(k) for k in extra[:5])
            raise InterpError(f"Checkpoint has unexpected tensor(s) {names}{more}; the file does "
                              "not match its config (or this family's converter).")


def detect_prefix(keys: Any, candidates: tuple[str, ...], probe: str) -> str:
    """The first prefix under which ``probe`` exists (``""`` if the keys are bare)."""
    keys = set(keys)
    for p in candidates:
        if p + probe in keys:
            return p
    return ""


def hf_get(hf: Any, name: str, default: Any = None) -> Any:
    """A field of a transformers config object or of a plain dict."""
    if isinstance(hf, Mapping):
        return hf.get(name, default)
    return getattr(hf, name, default)


def hf_require(hf: Any, name: str) -> Any:
    v = hf_get(hf, name)
    if v is None:
        raise InterpError(f"The config has no {name!r}; it is required for model_type "
                          f"{hf_get(hf, 'model_type')!r}.")
    return v


#: what str.splitlines() breaks a line at
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with its line breaks written as escapes (``\\n``): a message quoting a name
    from a hostile file (a config key ``"\\n"``) must still print as one line."""
    return _LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


@contextlib.contextmanager
def naming(path: Path, what: str) -> Iterator[None]:
    """Make every :class:`InterpError` raised inside name ``path`` (``what`` says what it is:
    ``"Folder"``, ``"GGUF file"``), so a problem found deep in a converter ("missing tensor")
    still says which file it is about; one-line messages that name it pass unchanged."""
    try:
        yield
    except InterpError as e:
        msg = one_line(str(e))
        if str(path) in msg and msg == str(e):
            raise
        raise InterpError(msg if str(path) in msg else f"{what} {str(path)!r}: {msg}") from None


HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration",
                 "ForPreTraining")


def has_lm_head(hf: Any, default: bool = True) -> bool:
    """Whether the checkpoint's class has a language-model head, from ``architectures``
    (``LlamaModel`` / ``BertModel`` have none; without ``architectures``, ``default``)."""
    archs = hf_get(hf, "architectures") or []
    if not archs:
        return default
    return any(str(a).endswith(HEAD_SUFFIXES) for a in archs)


def rope_theta(hf: Any, default: float = 10000.0) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` (or 4.x ``rope_theta``); scaled RoPE
    variants (linear, dynamic, yarn, llama3) are not implemented and are rejected."""
    params = hf_get(hf, "rope_parameters") or hf_get(hf, "rope_scaling") or {}
    kind = "default"
    if isinstance(params, Mapping):
        kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise InterpError(f"RoPE scaling {kind!r} is not supported; only plain RoPE ('default') "
                          "is implemented.")
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    if theta is None:
        theta = hf_get(hf, "rope_theta", default)
    return float(theta)


def rope_partial_factor(hf: Any) -> float:
    params = hf_get(hf, "rope_parameters") or {}
    f = params.get("partial_rotary_factor") if isinstance(params, Mapping) else None
    if f is None:
        f = hf_get(hf, "partial_rotary_factor", hf_get(hf, "rotary_pct", 1.0))
    return float(f)


ACTS = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu",
}


def act_name(hf_act: str, gated: bool = False) -> str:
    """transformers' ``hidden_act`` -> our ``act`` (gated FFNs map silu -> swiglu, gelu ->
    geglu)."""
    base = ACTS.get(str(hf_act))
    if base is None:
        raise InterpError(f"Activation {hf_act!r} is not supported; "
                          f"supported: {', '.join(sorted(ACTS))}.")
    if not gated:
        return base
    return {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh", "relu": "reglu"}[base]


def make_config(**fields: Any) -> ModelConfig:
    """ModelConfig, with a config problem turned into one InterpError line."""
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise InterpError(f"Cannot map this checkpoint's config: {one_line(str(e))}") from None


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The core's fused rows [q; k; v] (one matmul for all three)."""
    return torch.cat([q, k, v], dim=0)


def _build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` with every tensor on the meta device: no memory, no init cost.

    Loading then assigns the checkpoint's tensors, so peak memory is one copy of the weights
    rather than a random model plus the weights. PyTorch's own ``torch.device("meta")`` context
    does this per thread (a torch-function mode), with no process-wide patching; the buffers
    that are functions of the config, not weights, are filled by :func:`_fill_computed_buffers`.
    """
    from interp.model import build_model

    with torch.device("meta"):
        return build_model(cfg)


def _fill_computed_buffers(model: nn.Module) -> None:
    """Give each module's config-derived buffers (``computed_buffers()``) their real values."""
    for module in model.modules():
        computed = getattr(module, "computed_buffers", None)
        if computed is None:
            continue
        for name, value in computed().items():
            if getattr(module, name).device.type == "meta":
                module.register_buffer(name, value, persistent=False)


def _check_counts(cfg: ModelConfig, n_tensors: int, source: str) -> None:
    """Refuse a config whose layer or expert count the weights cannot possibly fill (each layer
    and each expert has at least one tensor) before building it: building even on the meta
    device takes time per module, so a crafted ``n_layers`` of 2**31 would hang the load."""
    layers = cfg.n_layers + (cfg.n_decoder_layers or 0)
    least = layers
    if cfg.n_experts and layers <= n_tensors:
        least += cfg.n_experts * sum(1 for i in range(cfg.n_layers) if cfg.is_moe_layer(i))
    if least > n_tensors:
        raise InterpError(f"The {source} hold {n_tensors} tensors, fewer than the {least} that "
                          f"the config's {layers} layers and {cfg.n_experts} experts need at "
                          "least; the config does not match the weights.")


def assemble(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, tokenizer: Any = None,
             device: Any = None, dtype: torch.dtype | None = None,
             source: str = "converted weights", copy: bool = False,
             adds_bos: bool | None = None) -> Any:
    """Build the model for ``cfg`` and assign ``state_dict`` into it (every key checked).

    ``copy=True`` when the tensors belong to someone else (an in-memory transformers model), so
    the two models never share storage. ``adds_bos`` is the checkpoint's BOS rule where the
    file states it (GGUF, an interp checkpoint); otherwise it is asked of ``tokenizer``
    (:func:`adopt_bos_rule`)."""
    _check_counts(cfg, len(state_dict), source)
    model = _build_on_meta(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise InterpError(f"The {source} do not fit the model of its config: missing tensor(s) "
                          f"{missing[:3]}, unexpected tensor(s) {unexpected[:3]}.")
    dtype = dtype or torch.float32
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise InterpError(f"Tensor {k!r} of the {source} has shape {list(v.shape)}, the model "
                              f"expects {list(own[k].shape)}.")
        if own[k].is_floating_point() and not v.is_floating_point():
            # an integer tensor would become an integer weight: a different model, not an error
            raise InterpError(f"Tensor {k!r} of the {source} has dtype {v.dtype}; the model "
                              "needs floating-point weights there.")
        fixed[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype, copy=copy)
    del state_dict
    model.load_state_dict(fixed, assign=True, strict=True)
    del fixed
    _fill_computed_buffers(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":  # pragma: no cover - guarded by the key check above
            raise InterpError(f"Tensor {name!r} was never loaded.")
    if device is not None or dtype != torch.float32:
        model = model.to(device=device, dtype=dtype) if device is not None else model.to(dtype)
    model.tokenizer = tokenizer
    if adds_bos is None and tokenizer is not None:
        adds_bos = tokenizer_adds_bos(tokenizer)
    adopt_bos_rule(model, adds_bos)
    return model.eval()


def adopt_bos_rule(model: Any, adds_bos: bool | None) -> None:
    """Give a decoder its checkpoint's BOS rule (``model.prepend_bos`` =
    ``cfg.default_prepend_bos``), unless the caller set ``default_prepend_bos`` as an override
    (then the field is no longer derived) or the checkpoint says nothing (``adds_bos`` None)."""
    if adds_bos is None or model.cfg.architecture != "decoder":
        return
    if "default_prepend_bos" in dict(model.cfg._derived):  # still the config's default
        model.prepend_bos = bool(adds_bos)


def apply_overrides(cfg: ModelConfig, fields: dict[str, Any]) -> ModelConfig:
    """``cfg.replace`` (the exact form of ``dataclasses.replace``) with a bad value turned
    into one InterpError line."""
    if not fields:
        return cfg
    try:
        return cfg.replace(**fields)  # the exact form: a field named here is explicit
    except (ValueError, TypeError) as e:
        raise InterpError(f"Invalid override: {one_line(str(e))}") from None
