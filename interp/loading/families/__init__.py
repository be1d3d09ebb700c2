"""The registry of checkpoint families, chosen by ``config.json``'s ``model_type``.

Each family is a pair of pure functions (STYLE.md, habit 6):

- ``config_from_hf(hf_config) -> ModelConfig``: every quirk of the family becomes a config
  field here (norm placement, rotary layout, biases, logit scale), never a name check in a
  component;
- ``convert_state_dict(state_dict, cfg) -> dict``: Hugging Face tensor names and layouts to
  the core's (fused ``attn.qkv`` rows [q; k; v], ``mlp.fc_in`` rows [gate; up]); every tensor
  is used and every shape checked (:class:`interp.loading._common.Tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from interp.config import ModelConfig
from interp.errors import InterpError


@dataclass(frozen=True)
class Family:
    """One checkpoint family: its config mapping and its tensor converter."""

    name: str
    config_from_hf: Callable[[Any], ModelConfig]
    convert_state_dict: Callable[[Mapping[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]


def _registry() -> dict[str, Family]:
    from interp.loading.families import (
        bert,
        bloom_mpt,
        gemma,
        gpt2,
        gpt_neox,
        gptj,
        llama,
        moe,
        olmo2_phi3,
        t5,
    )

    fams = [
        Family("gpt2", gpt2.config_from_hf, gpt2.convert_state_dict),
        Family("gpt_neox", gpt_neox.config_from_hf, gpt_neox.convert_state_dict),
        Family("llama", llama.config_from_hf, llama.convert_state_dict),
        Family("mistral", llama.config_from_hf, llama.convert_state_dict),
        Family("qwen2", llama.config_from_hf, llama.convert_state_dict),
        Family("qwen3", llama.config_from_hf, llama.convert_state_dict),
        Family("qwen3_moe", moe.config_from_hf, moe.convert_state_dict),
        Family("mixtral", moe.config_from_hf, moe.convert_state_dict),
        Family("qwen2_moe", moe.config_from_hf, moe.convert_state_dict),
        Family("olmoe", moe.config_from_hf, moe.convert_state_dict),
        Family("bert", bert.config_from_hf, bert.convert_state_dict),
        Family("t5", t5.config_from_hf, t5.convert_state_dict),
        Family("gemma", gemma.config_from_hf, gemma.convert_state_dict),
        Family("gemma2", gemma.config_from_hf, gemma.convert_state_dict),
        Family("gemma3_text", gemma.config_from_hf, gemma.convert_state_dict),
        Family("gemma3", gemma.config_from_hf, gemma.convert_state_dict),
        Family("olmo2", olmo2_phi3.config_from_hf, olmo2_phi3.convert_state_dict),
        Family("phi3", olmo2_phi3.config_from_hf, olmo2_phi3.convert_state_dict),
        Family("gptj", gptj.config_from_hf, gptj.convert_state_dict),
        Family("bloom", bloom_mpt.config_from_hf, bloom_mpt.convert_state_dict),
        Family("mpt", bloom_mpt.config_from_hf, bloom_mpt.convert_state_dict),
    ]
    return {f.name: f for f in fams}


FAMILIES: dict[str, Family] = _registry()


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def get_family(model_type: str) -> Family:
    """The family for a ``model_type``; an unknown one lists the supported ones."""
    fam = FAMILIES.get(str(model_type))
    if fam is None:
        raise InterpError(f"Unsupported model_type {model_type!r}; "
                          f"supported: {', '.join(supported_model_types())}.")
    return fam
