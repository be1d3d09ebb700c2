"""RoPE context-extension scalings: each one a change to the rotary frequencies.

A checkpoint trained at ``original_max_position_embeddings`` positions and stretched to more
changes RoPE's inverse frequencies ``1 / base**(2i/d)`` (and, for YaRN and LongRoPE, scales
cos and sin by an attention factor). One frozen :class:`RopeScaling` holds a type and its
parameters, as ``config.json``'s ``rope_scaling`` / ``rope_parameters`` write them:

- ``linear``: position interpolation, every frequency divided by ``factor`` (Chen et al. 2023,
  "Extending Context Window of Large Language Models via Positional Interpolation").
- ``dynamic``: dynamic NTK-aware scaling (bloc97 and emozilla, reddit r/LocalLLaMA 2023): past
  ``n_ctx`` the base grows to ``base * (factor * L / n_ctx - (factor - 1))**(d / (d - 2))`` for
  a sequence of length ``L``; within ``n_ctx`` it is plain RoPE.
- ``yarn``: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"): frequencies
  between ``beta_fast`` and ``beta_slow`` rotations over the original context blend linearly
  from extrapolated (``inv_freq``) to interpolated (``inv_freq / factor``); cos and sin are
  scaled by ``0.1 * mscale * ln(factor) + 1`` (their eq. 21).
- ``llama3``: Meta's Llama 3.1 ``apply_scaling`` (llama-models, ``reference_impl/model.py``):
  wavelengths shorter than ``original / high_freq_factor`` stay, longer than ``original /
  low_freq_factor`` are divided by ``factor``, and the band between is smoothly blended.
- ``longrope``: Phi-3's LongRoPE (Ding et al. 2024): one rescale factor per frequency,
  ``short_factor`` while the sequence fits the original context and ``long_factor`` past it,
  cos and sin scaled by ``sqrt(1 + ln(factor) / ln(original))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: the supported ``rope_type`` values and the parameters each one needs
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
}
#: ``rope_parameters`` keys that are not scaling parameters (read elsewhere, or ignored)
_NOT_SCALING = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeScaling:
    """One RoPE scaling: its ``rope_type`` and parameters (``None`` = the type's default)."""

    rope_type: str
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn (default 32)
    beta_slow: float | None = None  # yarn (default 1)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn, longrope: overrides the computed factor
    truncate: bool = True  # yarn: round the blend's band to whole dimensions
    long_factor: tuple[float, ...] | None = None  # longrope
    short_factor: tuple[float, ...] | None = None  # longrope

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"Unknown rope_scaling type {self.rope_type!r}; supported: "
                             f"{', '.join(ROPE_TYPES)} (or no scaling).")
        for name in ROPE_TYPES[self.rope_type]:
            if getattr(self, name) is None:
                raise ValueError(f"rope_scaling type {self.rope_type!r} needs {name!r}.")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("rope_type", "truncate") or v is None:
                continue
            values = v if isinstance(v, tuple) else (v,)
            if not all(isinstance(x, int | float) and not isinstance(x, bool)
                       and math.isfinite(x) and x > 0 for x in values):
                raise ValueError(f"rope_scaling {f.name} must be a positive finite number "
                                 f"(or a tuple of them), got {v!r}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling:
        """From ``config.json``'s ``rope_scaling`` (``type`` or ``rope_type``); keys that are
        not scaling parameters (``rope_theta``) are skipped, unknown keys refused."""
        if not isinstance(d, Mapping):
            raise ValueError(f"rope_scaling must be a dict, got {type(d).__name__}.")
        kind = d.get("rope_type", d.get("type"))
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in _NOT_SCALING or v is None:
                continue
            if k not in names:
                raise ValueError(f"Unknown rope_scaling field {k!r}; known: "
                                 f"{', '.join(sorted(names))}.")
            kw[k] = tuple(v) if isinstance(v, list | tuple) else v
        return cls(rope_type=str(kind), **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the type and the parameters that are set."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not (f.name == "truncate" and v):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.to_dict().items()
                           if k not in ("rope_type", "long_factor", "short_factor"))
        return f"{self.rope_type}({params})"

    def inv_freq(self, dim: int, base: float, n_ctx: int, seq_len: int
                 ) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [dim/2], attention factor on cos and sin) for a forward pass
        over ``seq_len`` positions of a model with ``n_ctx`` positions."""
        exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        plain = 1.0 / (base**exps)
        kind = self.rope_type
        if kind == "linear":
            return plain / self.factor, 1.0
        if kind == "dynamic":
            length = max(seq_len, n_ctx)
            grown = base * ((self.factor * length / n_ctx) - (self.factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (grown**exps), 1.0
        if kind == "llama3":
            return self._llama3(plain), 1.0
        if kind == "yarn":
            return self._yarn(dim, base, exps, n_ctx)
        return self._longrope(base, exps, n_ctx, seq_len)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        old = self.original_max_position_embeddings
        lo, hi, factor = self.low_freq_factor, self.high_freq_factor, self.factor
        wavelen = 2 * math.pi / inv_freq
        out = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, blended, out)

    def _yarn(self, dim: int, base: float, exps: torch.Tensor, n_ctx: int
              ) -> tuple[torch.Tensor, float]:
        old = self.original_max_position_embeddings or n_ctx
        factor = self.factor if self.factor is not None else n_ctx / old
        attn = self.attention_factor
        if attn is None:
            def m(scale: float, k: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
            if self.mscale and self.mscale_all_dim:
                attn = m(factor, self.mscale) / m(factor, self.mscale_all_dim)
            else:
                attn = m(factor, 1.0)

        def rotations_dim(n_rot: float) -> float:  # the dimension that turns n_rot times
            return dim * math.log(old / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = rotations_dim(self.beta_fast or 32), rotations_dim(self.beta_slow or 1)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        pos_freqs = base**exps
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(attn)

    def _longrope(self, base: float, exps: torch.Tensor, n_ctx: int, seq_len: int
                  ) -> tuple[torch.Tensor, float]:
        old = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else n_ctx / old
        attn = self.attention_factor
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        ext = self.long_factor if seq_len > old else self.short_factor
        if len(ext) != len(exps):
            raise ValueError(f"rope_scaling longrope factors have {len(ext)} entries; the "
                             f"rotary width needs {len(exps)} (rotary_dim / 2).")
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * base**exps), float(attn)


def as_rope_scaling(value: Any) -> RopeScaling | None:
    """A config's ``rope_scaling`` as given (None, a :class:`RopeScaling` or a dict)."""
    if value is None or isinstance(value, RopeScaling):
        return value
    return RopeScaling.from_dict(value)
