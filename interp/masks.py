"""Attention masks as small composable predicates of (query position, key position).

Following HF transformers' ``masking_utils``, a mask is a function of position indices that
says which keys a query may see; masks combine with ``&``, ``|`` and ``~``::

    causal() & sliding_window(4)          # Mistral-style local causal attention
    (causal() & block_sparse(8)) | (causal() & strided(8))   # Child et al. 2019, "strided"

Padding is not a mask spec: it comes from ``attention_mask`` at run time. Soft masks (a finite
penalty on masked positions) and temperatures are applied by the attention layer, see
:class:`interp.config.ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class MaskSpec:
    """Base class: ``allowed(q, k)`` returns a bool tensor broadcast from index tensors."""

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __and__(self, other: MaskSpec) -> MaskSpec:
        return And(self, other)

    def __or__(self, other: MaskSpec) -> MaskSpec:
        return Or(self, other)

    def __invert__(self) -> MaskSpec:
        return Not(self)

    def build(
        self, q_len: int, k_len: int, q_offset: int = 0, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The [q_len, k_len] bool matrix (True = may attend); queries start at ``q_offset``."""
        q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k = torch.arange(k_len, device=device)[None, :]
        return self.allowed(q, k).expand(q_len, k_len)

    @property
    def is_causal(self) -> bool:
        """True only for the plain causal mask, which SDPA runs with ``is_causal=True``."""
        return False

    @property
    def is_full(self) -> bool:
        """True only for plain bidirectional attention (no mask at all)."""
        return False


@dataclass(frozen=True)
class Causal(MaskSpec):
    """Each query sees itself and earlier keys (decoders)."""

    def allowed(self, q, k):
        return k <= q

    @property
    def is_causal(self) -> bool:
        return True

    def __str__(self) -> str:
        return "causal"


@dataclass(frozen=True)
class Bidirectional(MaskSpec):
    """Every query sees every key (encoders)."""

    def allowed(self, q, k):
        return torch.ones_like(q - k, dtype=torch.bool)

    @property
    def is_full(self) -> bool:
        return True

    def __str__(self) -> str:
        return "bidirectional"


@dataclass(frozen=True)
class PrefixLM(MaskSpec):
    """Bidirectional over the first ``prefix`` positions, causal after (Raffel et al. 2020, T5
    sec. 3.2.1)."""

    prefix: int

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, int) or self.prefix < 0:
            raise ValueError(f"prefix_lm needs a prefix length >= 0, got {self.prefix!r}.")

    def allowed(self, q, k):
        return (k <= q) | (k < self.prefix)

    def __str__(self) -> str:
        return f"prefix_lm({self.prefix})"


@dataclass(frozen=True)
class SlidingWindow(MaskSpec):
    """Keys within ``window`` positions of the query, ``|q - k| < window`` (Beltagy et al. 2020;
    Mistral). Combine with :func:`causal` for the decoder form, where ``t - window`` is hidden."""

    window: int

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(
                f"sliding_window needs a window of at least 1, got {self.window!r}; "
                "a window of 0 would hide every key."
            )

    def allowed(self, q, k):
        return (q - k).abs() < self.window

    def __str__(self) -> str:
        return f"sliding_window({self.window})"


@dataclass(frozen=True)
class BlockSparse(MaskSpec):
    """Attend only within the same block of ``block`` positions (block-local sparse attention,
    Child et al. 2019; Zaheer et al. 2020 without random/global parts)."""

    block: int

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block_sparse needs a block size of at least 1, got {self.block!r}.")

    def allowed(self, q, k):
        return (q // self.block) == (k // self.block)

    def __str__(self) -> str:
        return f"block_sparse({self.block})"


@dataclass(frozen=True)
class Strided(MaskSpec):
    """Attend to keys a multiple of ``stride`` away (the strided head of Child et al. 2019)."""

    stride: int

    def __post_init__(self) -> None:
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"strided needs a stride of at least 1, got {self.stride!r}.")

    def allowed(self, q, k):
        return ((q - k) % self.stride) == 0

    def __str__(self) -> str:
        return f"strided({self.stride})"


@dataclass(frozen=True)
class And(MaskSpec):
    a: MaskSpec
    b: MaskSpec

    def allowed(self, q, k):
        return self.a.allowed(q, k) & self.b.allowed(q, k)

    def __str__(self) -> str:
        return f"({self.a} & {self.b})"


@dataclass(frozen=True)
class Or(MaskSpec):
    a: MaskSpec
    b: MaskSpec

    def allowed(self, q, k):
        return self.a.allowed(q, k) | self.b.allowed(q, k)

    def __str__(self) -> str:
        return f"({self.a} | {self.b})"


@dataclass(frozen=True)
class Not(MaskSpec):
    a: MaskSpec

    def allowed(self, q, k):
        return ~self.a.allowed(q, k)

    def __str__(self) -> str:
        return f"~{self.a}"


def causal() -> MaskSpec:
    return Causal()


def bidirectional() -> MaskSpec:
    return Bidirectional()


def prefix_lm(prefix: int) -> MaskSpec:
    return PrefixLM(prefix)


def sliding_window(window: int) -> MaskSpec:
    return SlidingWindow(window)


def block_sparse(block: int) -> MaskSpec:
    return BlockSparse(block)


def strided(stride: int) -> MaskSpec:
    return Strided(stride)


#: Named masks for configs and the command line; parametrised ones take one int.
MASKS = {
    "causal": causal,
    "bidirectional": bidirectional,
    "prefix_lm": prefix_lm,
    "sliding_window": sliding_window,
    "block_sparse": block_sparse,
    "strided": strided,
}


def parse_mask(text: str) -> MaskSpec:
    """Parse ``"causal"``, ``"sliding_window:4"`` or ``"causal&sliding_window:4"`` (``&``/``|``)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"A mask must be a non-empty string such as 'causal', got {text!r}.")
    if "|" in text:
        parts = [parse_mask(p) for p in text.split("|")]
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if "&" in text:
        parts = [parse_mask(p) for p in text.split("&")]
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out
    name, _, arg = text.strip().partition(":")
    if name not in MASKS:
        raise ValueError(f"Unknown mask {name!r}; valid masks: {', '.join(MASKS)}.")
    if name in ("causal", "bidirectional"):
        if arg:
            raise ValueError(f"Mask {name!r} takes no parameter, got {arg!r}.")
        return MASKS[name]()
    try:
        value = int(arg)
    except ValueError:
        raise ValueError(
            f"Mask {name!r} needs an integer parameter, e.g. '{name}:4', got {arg!r}."
        ) from None
    return MASKS[name](value)


_LEAVES = {Causal: "causal", Bidirectional: "bidirectional", PrefixLM: "prefix_lm",
           SlidingWindow: "sliding_window", BlockSparse: "block_sparse", Strided: "strided"}


def mask_to_dict(mask: MaskSpec) -> dict:
    """JSON-able structural form of a mask (for checkpoints and run.json); see
    :func:`mask_from_dict`."""
    if isinstance(mask, And | Or):
        op = "and" if isinstance(mask, And) else "or"
        return {"op": op, "a": mask_to_dict(mask.a), "b": mask_to_dict(mask.b)}
    if isinstance(mask, Not):
        return {"op": "not", "a": mask_to_dict(mask.a)}
    name = _LEAVES[type(mask)]
    args = [getattr(mask, f) for f in mask.__dataclass_fields__]
    return {"name": name, "args": args}


def mask_from_dict(d: dict) -> MaskSpec:
    """Inverse of :func:`mask_to_dict`; a malformed dict is a ``ValueError``."""
    try:
        return _mask_from_dict(d)
    except (KeyError, TypeError, AttributeError):
        raise ValueError(
            f"Malformed serialised mask {d!r}; expected {{'name': ..., 'args': [...]}} "
            "or {'op': 'and'|'or'|'not', 'a': ..., 'b': ...}."
        ) from None


def _mask_from_dict(d: dict) -> MaskSpec:
    if not isinstance(d, dict):
        raise ValueError(f"A serialised mask must be a dict, got {type(d).__name__}.")
    op = d.get("op")
    if op == "and":
        return _mask_from_dict(d["a"]) & _mask_from_dict(d["b"])
    if op == "or":
        return _mask_from_dict(d["a"]) | _mask_from_dict(d["b"])
    if op == "not":
        return ~_mask_from_dict(d["a"])
    name = d.get("name")
    if name not in MASKS:
        raise ValueError(f"Unknown mask {name!r}; valid masks: {', '.join(MASKS)}.")
    return MASKS[name](*d.get("args", []))
