"""Masking strategies: the same weights under another attention mask, a soft mask, a
temperature, or BERT-style token masking.

A :class:`Strategy` is one intervention; :func:`parse_strategies` turns command-line specs
(``"sliding_window:4"``, ``"soft"``) into strategies for a model whose own mask is ``base``.
The masks come from :mod:`interp.masks`: sliding windows (Beltagy et al. 2020, *Longformer*),
a prefix-LM mask (Raffel et al. 2020, *T5*, sec. 3.2.1), block-local and strided sparse
patterns (Child et al. 2019, *Sparse Transformers*), soft masks that put a finite penalty on
masked scores instead of -inf (``p = 0`` is no mask, ``p -> inf`` the hard mask), attention
temperatures, and token masking (Devlin et al. 2019, *BERT*: [MASK] at 15%).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from interp import HookedTransformer
from interp.errors import InterpError
from interp.masks import (
    Bidirectional,
    MaskSpec,
    block_sparse,
    causal,
    prefix_lm,
    sliding_window,
    strided,
)

__all__ = ["DEFAULT_PARAMETERS", "STRATEGY_NAMES", "Strategy", "base_mask",
           "default_strategy_specs", "make_strategy", "parse_strategies"]

#: Strategy names accepted by :func:`parse_strategies` (``name`` or ``name:parameter``).
STRATEGY_NAMES = (
    "bidirectional", "causal", "sliding_window", "prefix_lm", "block_sparse", "strided",
    "soft", "temperature", "token_mask",
)

#: Parameters swept when a strategy is named without one. ``prefix_lm`` defaults to a quarter
#: and a half of the sequence; the others are absolute (positions, penalty, temperature, rate).
DEFAULT_PARAMETERS: dict[str, tuple[float, ...]] = {
    "sliding_window": (2, 4, 8, 16),
    "block_sparse": (4, 16),
    "strided": (4, 16),
    "soft": (0.0, 1.0, 2.0, 4.0, 8.0, 16.0),
    "temperature": (0.5, 0.8, 1.25, 2.0),
    "token_mask": (0.15,),
}

_VALID = ", ".join(STRATEGY_NAMES)


@dataclass(frozen=True)
class Strategy:
    """One intervention on the attention or the input, applied with the same weights.

    ``mask`` overrides the model's attention mask (None = its own); ``penalty`` makes the keys
    that ``mask`` hides visible at score ``-penalty`` instead of ``-inf``; ``temperature``
    divides the scores; ``token_mask_rate`` replaces that fraction of input tokens.
    ``hard_mask`` is the hard mask a soft strategy converges to as the penalty grows (None
    otherwise).
    """

    name: str
    parameter: float | None = None
    mask: MaskSpec | None = None
    penalty: float | None = None
    temperature: float | None = None
    token_mask_rate: float | None = None

    @property
    def label(self) -> str:
        if self.parameter is None:
            return self.name
        p = self.parameter
        whole = float(p).is_integer() and self.name != "temperature"
        return f"{self.name}:{int(p) if whole else p:g}"

    @property
    def hard_mask(self) -> MaskSpec | None:
        return self.mask if self.penalty is not None else None

    def describe(self) -> str:
        """One line for the table: the mask (and penalty / temperature / rate) actually used."""
        parts = []
        if self.mask is not None:
            parts.append(f"mask {self.mask}")
        if self.penalty is not None:
            parts.append(f"penalty {self.penalty:g} on keys it hides")
        if self.temperature is not None:
            parts.append(f"temperature {self.temperature:g}")
        if self.token_mask_rate is not None:
            parts.append(f"{self.token_mask_rate:.0%} of tokens replaced")
        return "; ".join(parts) or "the model's own mask"

    @contextlib.contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[None]:
        """Run-time override of the model's attention for this strategy."""
        kwargs: dict = {}
        if self.mask is not None:
            kwargs["mask"] = self.mask
        if self.penalty is not None:
            kwargs["soft_mask_penalty"] = float(self.penalty)
        if self.temperature is not None:
            kwargs["temperature"] = float(self.temperature)
        with model.override_attention(**kwargs):
            yield


def base_mask(model: HookedTransformer) -> MaskSpec:
    """The mask every strategy is compared against: the model's own, from its config."""
    return model.cfg.mask


def _int_parameter(name: str, value: float) -> int:
    if not float(value).is_integer():
        raise InterpError(f"Strategy {name!r} needs a whole number of positions, got {value:g}; "
                          f"e.g. '{name}:4'.")
    return int(value)


def _check_parameter(name: str, parameter: float | None) -> None:
    if name not in STRATEGY_NAMES:
        raise InterpError(f"Unknown masking strategy {name!r}; valid strategies: {_VALID}.")
    takes = name not in ("bidirectional", "causal")
    if not takes and parameter is not None:
        raise InterpError(f"Strategy {name!r} takes no parameter, got {parameter!r}; write just "
                          f"'{name}'.")
    if takes and parameter is None:
        raise InterpError(f"Strategy {name!r} needs a parameter, e.g. "
                          f"'{name}:{_example(name)}'.")
    finite = isinstance(parameter, int | float) and math.isfinite(parameter)
    if parameter is not None and not finite:
        raise InterpError(f"Strategy {name!r} needs a finite number as parameter, got "
                          f"{parameter!r}.")


def _mask_strategy(name: str, parameter: float | None, base: MaskSpec) -> Strategy | None:
    """The strategies that are a structural mask (None for the others)."""
    if name == "bidirectional":
        return Strategy(name, None, mask=Bidirectional())
    if name == "causal":
        return Strategy(name, None, mask=causal())
    if name == "sliding_window":
        w = _int_parameter(name, parameter)
        if w < 1:
            raise InterpError(f"A sliding window must be at least 1 position wide, got {w}: a "
                              "window of 0 would hide every key, even the query itself.")
        return Strategy(name, float(w), mask=_meet(base, sliding_window(w)))
    if name == "prefix_lm":
        n = _int_parameter(name, parameter)
        if n < 0:
            raise InterpError(f"A prefix-LM prefix length must be >= 0, got {n}.")
        return Strategy(name, float(n), mask=prefix_lm(n))
    if name == "block_sparse":
        b = _int_parameter(name, parameter)
        if b < 1:
            raise InterpError(f"A block-sparse block must hold at least 1 position, got {b}.")
        return Strategy(name, float(b), mask=_meet(base, block_sparse(b)))
    if name == "strided":
        s = _int_parameter(name, parameter)
        if s < 1:
            raise InterpError(f"A stride must be at least 1, got {s}.")
        return Strategy(name, float(s), mask=_meet(base, sliding_window(s) | strided(s)))
    return None


def make_strategy(name: str, parameter: float | None, base: MaskSpec) -> Strategy:
    """Build one strategy for a model whose own mask is ``base`` (``model.cfg.mask``), which
    decides what "sliding window" etc. mean.

    Mask-shaped strategies are intersected with the model's own mask (a sliding window on a
    decoder stays causal); ``bidirectional``, ``causal`` and ``prefix_lm`` replace it. ``soft``
    softens the model's own mask, or the causal mask when the model's own mask hides nothing
    (an encoder): there ``p = 0`` is the baseline and ``p -> inf`` the hard causal mask.
    """
    _check_parameter(name, parameter)
    try:
        made = _mask_strategy(name, parameter, base)
    except ValueError as e:  # a mask constructor's own check
        raise InterpError(str(e)) from None
    if made is not None:
        return made
    if name == "soft":
        if parameter < 0:
            raise InterpError("A soft-mask penalty must be >= 0 (it is subtracted from the scores "
                              "of masked keys; larger = closer to the hard mask), got "
                              f"{parameter:g}.")
        target = causal() if base.is_full else base
        return Strategy(name, float(parameter), mask=target, penalty=float(parameter))
    if name == "temperature":
        if parameter <= 0:
            raise InterpError(f"An attention temperature must be > 0, got {parameter:g}.")
        return Strategy(name, float(parameter), temperature=float(parameter))
    # token_mask
    if not 0 < parameter <= 1:
        raise InterpError(f"A token-masking rate must be in (0, 1], got {parameter:g}; BERT "
                          "uses 0.15.")
    return Strategy(name, float(parameter), token_mask_rate=float(parameter))


def _example(name: str) -> str:
    return {"soft": "8", "temperature": "0.5", "token_mask": "0.15"}.get(name, "4")


def _meet(base: MaskSpec, extra: MaskSpec) -> MaskSpec:
    return extra if base.is_full else base & extra


def default_strategy_specs(base: MaskSpec) -> list[str]:
    """Every strategy with its default sweep; the opposite of the model's own mask first."""
    opposite = "causal" if base.is_full else "bidirectional"
    return [opposite, "sliding_window", "prefix_lm", "block_sparse", "strided", "soft",
            "temperature", "token_mask"]


def _values(name: str, sep: str, arg: str, seq_len: int) -> Sequence[float | None]:
    """The parameters one spec asks for: its own, or the default sweep of a bare name."""
    if sep:
        try:
            return [float(arg)]
        except ValueError:
            raise InterpError(f"Strategy {name!r} needs a number after ':', got {arg!r}; e.g. "
                              f"'{name}:{_example(name)}'.") from None
    if name in ("bidirectional", "causal"):
        return [None]
    if name == "prefix_lm":
        return sorted({max(1, seq_len // 4), max(1, seq_len // 2)})
    return DEFAULT_PARAMETERS[name]


def parse_strategies(specs: Sequence[str] | None, base: MaskSpec,
                     seq_len: int) -> list[Strategy]:
    """``["bidirectional", "sliding_window:4", "soft"]`` -> strategies for a model whose own
    mask is ``base`` (a bare name sweeps its defaults; None = every strategy). Unknown names
    and bad parameters raise InterpError."""
    specs = default_strategy_specs(base) if not specs else list(specs)
    out: list[Strategy] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise InterpError("A strategy must be a name such as 'sliding_window:4', got "
                              f"{spec!r}; valid strategies: {_VALID}.")
        name, sep, arg = spec.strip().partition(":")
        name = name.strip().replace("-", "_")
        if name not in STRATEGY_NAMES:
            raise InterpError(f"Unknown masking strategy {name!r}; valid strategies: {_VALID}.")
        for v in _values(name, sep, arg, seq_len):
            s = make_strategy(name, v, base)
            if s not in out:
                out.append(s)
    return out
