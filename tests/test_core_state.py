"""Run-time state is typed and documented in one place (interp.state; issue 17, item 2)."""

from __future__ import annotations

import pytest
import torch

import interp
from interp import InterpError, ModelConfig, build_model, masks
from interp.state import AttentionOverride, StackLayer

BASE = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=32)


def test_override_attention_fills_every_field_and_restores_on_exit() -> None:
    model = build_model(ModelConfig(**BASE, attn_temperature=0.8))
    assert model.attention_override is None and model.effective_mask == masks.causal()
    with model.override_attention(mask="bidirectional"):
        o = model.attention_override
        assert o == AttentionOverride(masks.bidirectional(), None, 0.8)
        assert model.effective_mask == masks.bidirectional()
        with model.override_attention(soft_mask_penalty=2.0):
            assert model.attention_override == AttentionOverride(masks.bidirectional(), 2.0, 0.8)
            with model.override_attention(soft_mask_penalty=None):  # None = back to a hard mask
                assert model.attention_override.soft_mask_penalty is None
        assert model.attention_override == o
    assert model.attention_override is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(penalty=1.0), "unknown argument 'penalty'"),
        (dict(mask=None), "leave it out to keep the current mask"),
        (dict(temperature=None), "leave it out to keep the current temperature"),
    ],
)
def test_override_attention_rejects_unknown_names_and_none(kw: dict, match: str) -> None:
    model = build_model(ModelConfig(**BASE))
    with pytest.raises(InterpError, match=match):
        with model.override_attention(**kw):
            pass
    assert model.attention_override is None


def test_head_gates_and_attn_result_are_typed_per_layer() -> None:
    model = build_model(ModelConfig(**BASE))
    assert model.head_gates == {} and model.use_attn_result is False
    gates = torch.ones(2, 4)
    model.set_head_gates(gates)
    assert set(model.head_gates) == {StackLayer("blocks", 0), StackLayer("blocks", 1)}
    assert model.blocks[1].attn.head_gate is not None
    model.set_head_gates(None)
    assert model.head_gates == {}
    model.set_use_attn_result(True)
    assert model.use_attn_result and all(b.attn.use_attn_result for b in model.blocks)
    model.set_use_attn_result(False)
    assert not model.use_attn_result


def test_prepend_bos_is_the_configs_default_prepend_bos() -> None:
    """One value, two names: model.prepend_bos is cfg.default_prepend_bos (TransformerLens'
    name), so setting either side is seen from the other."""
    decoder = interp.HookedTransformer(ModelConfig(**BASE))
    encoder = interp.HookedTransformer(ModelConfig(**BASE, architecture="encoder"))
    assert decoder.prepend_bos is True and encoder.prepend_bos is False
    assert decoder.cfg.default_prepend_bos is True and encoder.cfg.default_prepend_bos is False
    decoder.prepend_bos = False
    assert decoder.cfg.default_prepend_bos is False
    off = interp.HookedTransformer(ModelConfig(**BASE, default_prepend_bos=False))
    assert off.prepend_bos is False


def test_encoder_decoder_effective_mask_is_its_decoders() -> None:
    model = build_model(ModelConfig(**BASE, architecture="encoder_decoder", positional="relative"))
    assert model.effective_mask == masks.causal()
    with model.override_attention(soft_mask_penalty=1.0):
        assert model.attention_override.mask == masks.causal()
