"""nnsight traces reach interp's hook points (issue 19).

nnsight (0.8) registers no torch hooks: it installs a controller as each wrapped module's
instance ``forward`` and expects every module to be called in order. interp skips hook points
that nothing watches (:func:`interp.hooks.hp`); it now treats an instance-level ``forward`` as
watching, so a trace reads and edits ``blocks.{l}.attn.hook_z`` (and the eager-only
``hook_pattern``) exactly as ``run_with_hooks`` does, while unwrapped models keep skipping.
"""

from __future__ import annotations

import pytest
import torch

import interp
from interp import ModelConfig, build_model
from interp.hooks import is_reached

nnsight = pytest.importorskip("nnsight")


def zero_head(z: torch.Tensor, hook=None, head: int = 1) -> torch.Tensor:
    z = z.clone()
    z[:, :, head] = 0.0
    return z


def check_trace_matches_run_with_hooks(model, tokens: torch.Tensor, layer: int) -> None:
    """Read hook_z and hook_pattern, zero one head's z, and compare with run_with_hooks."""
    name = f"blocks.{layer}.attn.hook_z"
    want = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_head)])
    _, cache = model.run_with_cache(
        tokens, names_filter=[name, f"blocks.{layer}.attn.hook_pattern"]
    )
    wrapped = nnsight.NNsight(model)
    attn = wrapped.blocks[layer].attn
    with wrapped.trace(tokens):
        pattern = attn.hook_pattern.output.save()  # in forward order: pattern, then z
        z = attn.hook_z.output.clone().save()  # a copy: the edit below is in place
        attn.hook_z.output[:, :, 1] = 0.0
        logits = wrapped.output.save()
    torch.testing.assert_close(z, cache[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pattern, cache[f"blocks.{layer}.attn.hook_pattern"])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, model(tokens), atol=1e-4)


def small_model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_vocab=50, n_ctx=16,
        positional="rope", norm="rmsnorm", act="swiglu",
    )
    return build_model(cfg).eval()


def test_nnsight_reads_and_edits_hook_z_on_a_small_model() -> None:
    model = small_model()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    check_trace_matches_run_with_hooks(model, tokens, layer=3)


def test_nnsight_reads_opt_in_hook_result() -> None:
    model = small_model()
    model.set_use_attn_result(True)
    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.2.attn.hook_result")
    wrapped = nnsight.NNsight(model)
    with wrapped.trace(tokens):
        result = wrapped.blocks[2].attn.hook_result.output.save()
    torch.testing.assert_close(result, cache["blocks.2.attn.hook_result"])


def test_unwrapped_models_keep_skipping_unwatched_hook_points() -> None:
    model = small_model()
    hook = model.blocks[0].attn.hook_z
    assert not is_reached(hook)
    calls = []
    original = type(hook).forward
    try:  # count calls through the class, which is not an instance-level forward
        type(hook).forward = lambda self, x: calls.append(1) or original(self, x)
        model(torch.zeros(1, 3, dtype=torch.long))
    finally:
        type(hook).forward = original
    assert calls == []
    nnsight.NNsight(model)
    assert is_reached(hook)


@pytest.mark.slow
def test_nnsight_on_smollm2_matches_run_with_hooks() -> None:
    try:
        model = interp.load_pretrained("smollm2-135m")
    except interp.InterpError as e:  # the package that holds the weights is missing
        pytest.skip(str(e))
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    check_trace_matches_run_with_hooks(model, tokens, layer=3)
