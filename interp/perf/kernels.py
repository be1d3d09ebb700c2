"""The linear layers' CPU kernel: oneDNN's float32 GEMM where autograd is not recording.

PyTorch's CPU wheels route ``F.linear`` to MKL's ``sgemm``. The same wheels ship oneDNN, whose
JIT-compiled float32 GEMM measured 10-25% faster at every shape of GPT-2 small and SmolLM2 on
this project's CPU (an AMD EPYC with AVX-512, 2 threads; 1,024 tokens: 576 -> 3,072 17.1 vs
20.3 ms, the 49,152-way unembedding 330 vs 391 ms; 8 tokens: 0.26 vs 0.36 ms; BENCHMARKS.md
change 9). Matrix products are ~90% of an unhooked forward on the CPU, so this is where
interp gets ahead of plain transformers without recording less.

The oneDNN path (``torch.ops.mkldnn._linear_pointwise``, the op Inductor uses for frozen CPU
linears) computes in float32 throughout, but sums in a different order from MKL, and a little
less accurately: against a float64 forward, one 576 -> 3,072 product is off by 7e-7 of its
scale (MKL 4e-7), SmolLM2's 60 attention and MLP outputs by at most 1.7e-5 of theirs (MKL
5.2e-6). Both are float32 rounding; every parity test holds. Set the switch below when bits
must match another MKL-based run. The path is taken only when all of these hold, and
``F.linear`` runs otherwise:

* the input is a float32 CPU tensor (CUDA, half precision and meta tensors keep PyTorch's own
  dispatch);
* autograd is not recording through this call (the op has no tested backward: training and
  gradient-based attribution get ``F.linear``'s exact autograd);
* nothing is tracing or compiling the model (``torch.jit``, ``torch.compile``, ``torch.func``
  transforms see the plain op they know).

``use_onednn_linear(False)`` or ``INTERP_CPU_LINEAR=aten`` in the environment turns it off
(for example to compare the two on another CPU: only this project's AMD EPYC was measured, and
MKL may do better on Intel's). Off x86-64 (ARM) the path is never taken.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "linear", "onednn_linear_available", "use_onednn_linear", "uses_onednn_linear"]


def _find_op():
    """The oneDNN linear op on x86-64 builds that have it (measured there; on ARM PyTorch's own
    BLAS choice stays), else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if torch.backends.mkldnn.is_available() else None


_OP = _find_op()
_OFF = ("aten", "mkl", "0", "off", "false", "no")
_enabled = os.environ.get("INTERP_CPU_LINEAR", "onednn").strip().lower() not in _OFF
_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
# torch < 2.3 has no torch.compiler.is_compiling
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear op."""
    return _OP is not None


def use_onednn_linear(enabled: bool) -> None:
    """Route float32 CPU linears through oneDNN (the default) or always through ``F.linear``."""
    global _enabled
    _enabled = bool(enabled)


def uses_onednn_linear() -> bool:
    """Whether eligible calls (see the module docstring) take the oneDNN path."""
    return _enabled and _OP is not None


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    needs_grad = any(t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_grad_enabled() and needs_grad:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or _is_compiling():
        return False
    return not (_is_wrapped is not None and (_is_wrapped(x) or _is_wrapped(weight)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias``, on oneDNN where eligible."""
    if _enabled and _OP is not None and _eligible(x, weight, bias):
        return _OP(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
