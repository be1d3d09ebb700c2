"""Sparse dictionaries over activations: sparse autoencoders (SAEs) and transcoders.

An SAE reads an activation ``x`` [..., d_in] at one hook and writes it as a sparse,
non-negative code ``f`` [..., d_sae] over a learned dictionary of directions (the rows of
``W_dec``), ``x_hat = f @ W_dec + b_dec`` (Bricken et al. 2023, "Towards Monosemanticity";
Cunningham et al. 2023). A transcoder has the same shape but predicts the activation at a
*different* hook (an MLP's output from its input; Dunefsky et al. 2024), so ``hook_name_out``
names where its output goes.

Three activation rules, each its own paper:

- ``relu``: ``f = ReLU(W_enc (x - b_dec) + b_enc)``, trained with an L1 penalty weighted by the
  decoder norms (Bricken et al. 2023; Anthropic's April 2024 update).
- ``topk``: keep the k largest pre-activations, zero the rest (Gao et al. 2024); sparsity is
  fixed by construction, no penalty needed.
- ``jumprelu``: ``f = z * [z > theta]`` with a learned per-feature threshold ``theta``
  (Rajamanoharan et al. 2024), trained with straight-through estimates of the L0.

The module carries its own :class:`HookPoint`s (``hook_sae_input``, ``hook_sae_acts``,
``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``), so once spliced into a model
(:mod:`analyses.dictionary.splice`) feature activations are recorded, patched and ablated
like any other hook. The weight names and layout (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae,
d_in], ``b_enc``, ``b_dec``, ``threshold``) are SAELens', so its files load directly
(:mod:`analyses.dictionary.saelens_format`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint

from interp.errors import InterpError

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig"]

Architecture = Literal["relu", "topk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("relu", "topk", "jumprelu")


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE or transcoder is; every field is saved with its weights.

    ``hook_name``: where it reads (``blocks.3.hook_resid_post``). ``hook_name_out``: where a
    transcoder writes (``blocks.3.hook_mlp_out``); None for an SAE (it writes back where it
    reads). ``k``: features kept per token for ``topk``. ``apply_b_dec_to_input``: subtract
    ``b_dec`` before encoding (the usual SAE choice; SAELens' field of the same name).
    ``jump_bandwidth``: width of the kernel in JumpReLU's straight-through gradient.
    """

    d_in: int
    d_sae: int
    hook_name: str = ""
    architecture: Architecture = "relu"
    k: int | None = None
    hook_name_out: str | None = None
    apply_b_dec_to_input: bool = True
    jump_bandwidth: float = 0.001
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InterpError(f"Unknown SAE architecture {self.architecture!r}; use one of "
                              f"{', '.join(ARCHITECTURES)}.")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InterpError(f"SAE {name} must be a positive integer, got {v!r}.")
        if self.architecture == "topk" and (not isinstance(self.k, int)
                                            or not 1 <= self.k <= self.d_sae):
            raise InterpError(f"A topk SAE needs k between 1 and d_sae={self.d_sae}, got "
                              f"{self.k!r}; pass k=.")

    @property
    def is_transcoder(self) -> bool:
        """Whether it writes to a different hook than it reads."""
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name


class _JumpStep(torch.autograd.Function):
    """Heaviside step ``[z > theta]`` whose gradient wrt ``theta`` is a rectangle kernel of
    width ``eps`` (Rajamanoharan et al. 2024, eq. 11): the pseudo-derivative that lets the
    threshold learn from an L0 penalty."""

    @staticmethod
    def forward(ctx: object, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)  # type: ignore[attr-defined]
        ctx.eps = eps  # type: ignore[attr-defined]
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps = ctx.eps  # type: ignore[attr-defined]
        near = ((z - theta).abs() < eps / 2).to(z.dtype)
        d_theta = -(1.0 / eps) * near * grad
        return None, d_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """``z * [z > theta]``: gradient to ``z`` where the gate is open, to ``theta`` through the
    same rectangle kernel scaled by ``theta`` (Rajamanoharan et al. 2024, eq. 10)."""

    @staticmethod
    def forward(ctx: object, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)  # type: ignore[attr-defined]
        ctx.eps = eps  # type: ignore[attr-defined]
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps = ctx.eps  # type: ignore[attr-defined]
        gate = (z > theta).to(z.dtype)
        near = ((z - theta).abs() < eps / 2).to(z.dtype)
        d_theta = -(theta / eps) * near * grad
        return gate * grad, d_theta.reshape(-1, theta.shape[-1]).sum(0), None


class SAE(nn.Module):
    """A sparse autoencoder or transcoder (see the module docstring for the three rules).

    ``forward(x)`` returns the reconstruction and passes every stage through a hook point:
    ``hook_sae_input`` [..., d_in], ``hook_sae_acts`` [..., d_sae] (the sparse code: ablate or
    steer features here), ``hook_sae_recons`` [..., d_in]. ``hook_sae_error`` and
    ``hook_sae_output`` are used by the splice, which adds the error back.
    """

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        # Decoder rows start as random unit vectors and the encoder as their transpose
        # (Conerly et al. 2024's init): features start out as their own best detectors.
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec * 0.1)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), 0.001))
        self.hook_sae_input = HookPoint()  # [..., d_in]
        self.hook_sae_acts = HookPoint()  # [..., d_sae]
        self.hook_sae_recons = HookPoint()  # [..., d_in]
        self.hook_sae_error = HookPoint()  # [..., d_in] (the splice's error term)
        self.hook_sae_output = HookPoint()  # [..., d_in] (recons + error, what the model gets)

    def pre_acts(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """The encoder's affine map before the sparsifying nonlinearity."""
        x = x.to(self.W_enc.dtype)
        # a transcoder's b_dec lives in the output space: never subtract it from the input
        if self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """The sparse code (not hooked: use :meth:`forward` inside a model to record it)."""
        self._check_width(x)
        z = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(z)
        if arch == "topk":
            vals, idx = torch.topk(z, self.cfg.k or 1, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
        return _JumpReLU.apply(z, self.threshold, self.cfg.jump_bandwidth)

    def decode(self, f: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        """``f @ W_dec + b_dec``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_in"]:
        """Reconstruct ``x`` through the hooked code; the result has ``x``'s dtype."""
        x = self.hook_sae_input(x)
        f = self.hook_sae_acts(self.encode(x))
        return self.hook_sae_recons(self.decode(f)).to(x.dtype)

    def l0_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """JumpReLU's differentiable L0 (mean active features per row), via :class:`_JumpStep`."""
        z = self.pre_acts(x)
        return _JumpStep.apply(z, self.threshold, self.cfg.jump_bandwidth).sum(-1).mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every decoder row unit norm, rescaling the encoder to keep the same map.

        Why: with unit rows, a feature's activation is its contribution's size, so L1 and
        activation magnitudes compare across features (and SAELens expects it)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self.W_dec.div_(norms)
        self.W_enc.mul_(norms.T)
        self.b_enc.mul_(norms.squeeze(-1))
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(norms.squeeze(-1))

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            where = f" at {self.cfg.hook_name}" if self.cfg.hook_name else ""
            raise InterpError(
                f"This SAE reads vectors of width d_in={self.cfg.d_in} but the activation"
                f"{where} has width {x.shape[-1]}; train or load an SAE for that hook "
                f"(d_in={x.shape[-1]}) or splice it at a hook of width {self.cfg.d_in}.")

    def with_config(self, **changes: object) -> SAE:
        """A copy with config fields replaced (weights shared), e.g. another ``hook_name``."""
        new = SAE(dataclasses.replace(self.cfg, **changes))  # type: ignore[arg-type]
        new.load_state_dict(self.state_dict())
        return new
