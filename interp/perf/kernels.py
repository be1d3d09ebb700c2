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
(for example to compare the two on another CPU). Off x86-64 (ARM) the path is never taken.

On an Intel Xeon (Emerald Rapids, AMX) MKL is the faster one: causal tracing of SmolLM2 ran
12-16% faster on it than on oneDNN. But MKL's default sums change with the thread count (2.7e-6
relative between one and two threads), over the 1e-6 within which a data-parallel run must
reproduce the one-process numbers. MKL's conditional numerical reproducibility in strict mode
(``MKL_CBWR=AUTO,STRICT``) makes them independent of it at no measured cost, but it is a
process-wide switch that only takes effect before MKL's first call. So a library import never
sets it; :func:`use_reproducible_mkl` is for a process that owns itself: the ``interp``
command calls it first thing, and its linears take MKL when strict mode took effect on an
Intel CPU (on the AMD EPYC of change 9 oneDNN was the faster one, and stays).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "bf16_products", "cpu_linear_kernel", "linear", "linear_products",
           "mkl_reproducible", "onednn_linear_available", "use_onednn_linear",
           "use_reproducible_mkl", "uses_onednn_linear"]


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


# ------------------------------------------------------------------ MKL, reproducibly
_MKL_CBWR_ALL, _MKL_CBWR_AUTO, _MKL_CBWR_STRICT = -1, 2, 0x10000


@functools.cache
def _mkl_cbwr() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """MKL's CNR getter and setter (``mkl_cbwr_get``/``_set``, exported by PyTorch's CPU
    library as ``mkl_serv_cbwr_*``), or None on builds without MKL (looked up once)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib",
                                       "libtorch_cpu.so"))
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    for f in (get, set_):
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, set_


def mkl_reproducible() -> bool:
    """Whether MKL runs in strict conditional-numerical-reproducibility mode, where its sums
    do not depend on the number of threads."""
    cbwr = _mkl_cbwr()
    return cbwr is not None and bool(cbwr[0](_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def use_reproducible_mkl() -> bool:
    """For a process that owns itself (the ``interp`` command, before any product): switch MKL
    to strict reproducible mode and route float32 CPU linears to MKL, on an Intel CPU. Returns
    whether linears now take MKL.

    Nothing changes when the user chose (``INTERP_CPU_LINEAR`` or ``MKL_CBWR`` set: the
    latter is honoured, and MKL is taken only if it asks for strict mode), off Intel CPUs,
    without MKL, or once MKL has run in this process (its mode can no longer change; an
    in-process caller such as a test keeps oneDNN and its numbers).
    """
    if "INTERP_CPU_LINEAR" in os.environ or _OP is None or not _intel_cpu():
        return False
    cbwr = _mkl_cbwr()
    if cbwr is None:
        return False
    if "MKL_CBWR" not in os.environ and cbwr[1](_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) != 0:
        return False  # MKL already ran here: its mode is fixed
    if not mkl_reproducible():
        return False
    use_onednn_linear(False)
    return True


def cpu_linear_kernel() -> str:
    """Which kernel eligible float32 CPU linears take, for a run's record: ``oneDNN``,
    ``MKL (strict reproducible mode)`` or ``MKL``."""
    if uses_onednn_linear():
        return "oneDNN"
    return "MKL (strict reproducible mode)" if mkl_reproducible() else "MKL"


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    needs_grad = any(t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.is_grad_enabled() and needs_grad:
        return False
    return _untraced(x, weight)


def _untraced(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Nothing is tracing, scripting, compiling or functorch-transforming this call: those see
    the plain op they know, never interp's own paths."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or _is_compiling():
        return False
    return not (_is_wrapped is not None and (_is_wrapped(x) or _is_wrapped(weight)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias``, on oneDNN where eligible (or
    with bfloat16 products inside :func:`bf16_products`)."""
    products = _PRODUCTS.get()
    if products is not None and _bf16_eligible(x, weight):
        return _Bf16Linear.apply(x, weight, bias, products.weight(weight))
    if _enabled and _OP is not None and _eligible(x, weight, bias):
        return _OP(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ------------------------------------------------------------------ bfloat16 products
class _Bf16Weights:
    """bfloat16 copies of the float32 weights seen inside one :func:`bf16_products` block,
    made once per weight (and again if it is edited in place: its version counter moves), so
    a forward pays the cast once, not once per call. Freed when the block ends."""

    def __init__(self) -> None:
        # id -> (weak reference, version, copy); keyed by id because tensors compare
        # element-wise, which weakref.WeakKeyDictionary cannot use
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        hit = self._copies.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == w._version:
            return hit[2]
        copy = w.detach().to(torch.bfloat16)
        self._copies[id(w)] = (weakref.ref(w), w._version, copy)
        return copy


_PRODUCTS: ContextVar[_Bf16Weights | None] = ContextVar("interp_bf16_products", default=None)


def _bf16_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device != weight.device:
        return False
    return _untraced(x, weight)


class _Bf16Linear(torch.autograd.Function):
    """``x @ W.T + b`` with both factors rounded to bfloat16 and the sums kept in float32
    (oneDNN/AMX on CPU, tensor cores on CUDA); the output, the bias and everything around the
    product stay float32. The backward uses the same rounding, so gradient-based methods
    (integrated gradients) see the function the forward computed."""

    @staticmethod
    def forward(ctx, x, weight, bias, w16):  # noqa: ANN001, ANN205 (autograd signature)
        x16 = x.to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.has_bias = bias is not None
        out = F.linear(x16, w16).float()
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 (autograd signature)
        x16, w16 = ctx.saved_tensors
        g16 = grad.to(torch.bfloat16)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g16 @ w16).float()
        if ctx.needs_input_grad[1]:
            gw = (g16.reshape(-1, g16.shape[-1]).T @ x16.reshape(-1, x16.shape[-1])).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb, None


@contextlib.contextmanager
def bf16_products() -> Iterator[None]:
    """Inside this block every interp linear layer (attention and FFN projections, the
    unembedding) multiplies in bfloat16 with float32 sums; the residual stream, norms,
    softmaxes and attention scores stay float32.

    Why: on CPUs with AMX (Intel Sapphire Rapids and later) a bfloat16 product runs ~4x
    faster than float32 at the row counts of batched interventions (256 x 576 -> 1536: 1,210
    vs 265 GFLOP/s on 2 threads here), and matrix products are ~80% of a forward. What it
    costs: each product is off by about 2^-9 of its scale, and over SmolLM2's 30 layers an
    answer probability moves by up to 0.017 (BENCHMARKS.md, "FFN throughput"), so callers opt
    in (``interp ffn --products bfloat16``). Scoped to the block and to the current thread or
    task (a context variable): nothing outside it changes, and the bfloat16 weight copies are
    freed when it ends.
    """
    token = _PRODUCTS.set(_Bf16Weights())
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def linear_products() -> str:
    """``"bfloat16"`` inside :func:`bf16_products`, else ``"float32"``."""
    return "bfloat16" if _PRODUCTS.get() is not None else "float32"
