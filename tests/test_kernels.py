"""The CPU linear kernel: oneDNN where eligible, F.linear's exact autograd everywhere else."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.config import ModelConfig
from interp.perf import kernels

pytestmark = pytest.mark.skipif(
    not kernels.onednn_linear_available(), reason="this PyTorch build has no oneDNN linear op"
)


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reach the oneDNN op."""
    seen: list[tuple[int, ...]] = []
    real = kernels._OP

    def counting(x, w, b, *args):
        seen.append(tuple(x.shape))
        return real(x, w, b, *args)

    monkeypatch.setattr(kernels, "_OP", counting)
    monkeypatch.setattr(kernels, "_enabled", True)
    return seen


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (24,), (0, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_f_linear_and_takes_onednn_without_grad(calls, shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if with_bias else None
    with torch.no_grad():
        got = kernels.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [shape]


def test_non_contiguous_input_and_weight(calls):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 24, 6, generator=g).transpose(1, 2)  # [4, 6, 24], strided
    w = torch.randn(24, 40, generator=g).T  # [40, 24], strided
    with torch.inference_mode():
        got = kernels.linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_autograd_gets_f_linear_exactly(calls):
    g = torch.Generator().manual_seed(2)
    lin = kernels.Linear(24, 40)
    ref = torch.nn.Linear(24, 40)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(5, 24, generator=g)
    out, want = lin(x), ref(x)
    assert torch.equal(out, want)  # the same kernel, bit for bit
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad)
    assert calls == []  # autograd was recording: F.linear, not oneDNN


def test_grad_enabled_but_nothing_requires_grad_takes_onednn(calls):
    w = torch.randn(40, 24)
    kernels.linear(torch.randn(3, 24), w)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_keep_pytorch_dispatch(calls, dtype):
    x, w = torch.randn(3, 24, dtype=dtype), torch.randn(40, 24, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert calls == []


def test_switch_off_and_vmap_fall_back(calls):
    x, w = torch.randn(3, 24), torch.randn(40, 24)
    kernels.use_onednn_linear(False)
    try:
        assert not kernels.uses_onednn_linear()
        with torch.no_grad():
            assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    finally:
        kernels.use_onednn_linear(True)
    assert calls == []
    with torch.no_grad():
        got = torch.func.vmap(lambda r: kernels.linear(r, w))(x)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == []  # functorch's batched tensors take F.linear


def test_environment_variable_turns_it_off():
    env = {**os.environ, "INTERP_CPU_LINEAR": "aten"}
    code = "from interp.perf import kernels; print(kernels.uses_onednn_linear())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_model_forward_agrees_with_mkl_and_uses_onednn(calls):
    """A whole GQA/SwiGLU/RoPE decoder: the oneDNN forward and the F.linear forward agree to
    float32 rounding, every projection and the unembedding went through oneDNN, and the
    gradient path (training) still runs F.linear."""
    cfg = ModelConfig(
        n_layers=2,
        d_model=48,
        n_heads=4,
        n_kv_heads=2,
        d_mlp=96,
        d_vocab=97,
        n_ctx=32,
        positional="rope",
        norm="rmsnorm",
        act="swiglu",
    )
    torch.manual_seed(0)
    model = interp.HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = model(tokens)
    n_fast = len(calls)
    assert n_fast == 2 * 4 + 1  # per layer qkv, o, fc_in, fc_out; then the unembedding
    kernels.use_onednn_linear(False)
    try:
        with torch.no_grad():
            slow = model(tokens)
    finally:
        kernels.use_onednn_linear(True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    model(tokens).sum().backward()
    assert len(calls) == n_fast
