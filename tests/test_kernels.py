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


# ------------------------------------------------------------------ MKL, reproducibly
_mkl_strict = pytest.mark.skipif(
    kernels._mkl_cbwr() is None or not kernels._intel_cpu(),
    reason="needs an Intel CPU and PyTorch's MKL (use_reproducible_mkl does nothing elsewhere)",
)

#: Products whose MKL sums moved with the thread count on the project's Xeon by default
#: (576 -> 960 at 5 and 8 rows, 1,536 -> 576 at 63-129 rows), and the unembedding's shape.
_THREAD_CHECK = """
import torch
from interp.perf import kernels
print(kernels.use_reproducible_mkl(), kernels.uses_onednn_linear(), kernels.cpu_linear_kernel())
torch.manual_seed(0)
diff = 0
for k, n, rows in ((576, 960, (5, 8)), (1536, 576, (63, 64, 100, 129)), (576, 4096, (7, 300))):
    w = torch.randn(n, k) * 0.05
    for m in rows:
        x = torch.randn(m, k)
        with torch.no_grad():
            torch.set_num_threads(1); one = kernels.linear(x, w)
            torch.set_num_threads(2); two = kernels.linear(x, w)
        diff += not torch.equal(one, two)
print(diff)
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without a kernel choice of the caller's, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in ("INTERP_CPU_LINEAR", "MKL_CBWR")}
    return {**base, **extra}


def _python(code: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=_env(**env),
                         capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


@_mkl_strict
def test_reproducible_mkl_sums_do_not_depend_on_the_thread_count():
    """A fresh process (what the interp command is) switches MKL to strict reproducible mode
    and its linears to MKL: one and two threads give the same bits on shapes whose default
    MKL sums differ between them."""
    first, diff = _python(_THREAD_CHECK)[:2]
    assert first == "True False MKL (strict reproducible mode)"
    assert diff == "0"


@_mkl_strict
def test_reproducible_mkl_leaves_a_process_where_mkl_already_ran_alone():
    """Once MKL has run its mode is fixed: the call changes nothing and oneDNN stays (an
    in-process caller keeps its numbers); a user's INTERP_CPU_LINEAR or MKL_CBWR wins."""
    ran = "import torch; torch.mm(torch.ones(8, 8), torch.ones(8, 8))\n"
    assert _python(ran + _THREAD_CHECK)[0] == "False True oneDNN"
    assert _python(_THREAD_CHECK, INTERP_CPU_LINEAR="onednn")[0] == "False True oneDNN"
    assert _python(_THREAD_CHECK, MKL_CBWR="AUTO")[0] == "False True oneDNN"
    assert _python(_THREAD_CHECK, MKL_CBWR="AUTO,STRICT")[0] == (
        "True False MKL (strict reproducible mode)")


@_mkl_strict
def test_the_interp_command_runs_reproducible_mkl_and_records_it(tmp_path):
    """The command chooses strict MKL before its first product, and run.json says so."""
    import json

    out = tmp_path / "r"
    data = os.path.join(os.path.dirname(interp.__file__), "data", "knowledge.pt")
    subprocess.run([sys.executable, "-m", "analyses.app.cli", "ffn", data, "--max-facts", "1",
                    "--samples", "1", "--ig-steps", "2", "--kv-layers", "0", "--top-k", "2",
                    "--max-tokens", "64", "--out", str(out), "-q"], env=_env(), check=True,
                   capture_output=True)
    cpu = json.loads((out / "run.json").read_text())["cpu"]
    assert cpu == {"linear_kernel": "MKL (strict reproducible mode)",
                   "threads": cpu["threads"]} and cpu["threads"] >= 1
