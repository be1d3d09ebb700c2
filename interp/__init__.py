"""interp: a hookable transformer with every documented variant, and what it records.

>>> import torch, interp
>>> cfg = interp.ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=100, n_ctx=32)
>>> model = interp.HookedTransformer(cfg)
>>> _, cache = model.run_with_cache(torch.randint(0, 100, (1, 10)))
>>> cache["pattern", 1].shape[-1]
10
"""

from interp import masks
from interp.activation_store import ActivationStore, write_activations
from interp.config import ModelConfig
from interp.errors import HookNameError, InterpError
from interp.masks import MaskSpec, parse_mask
from interp.model import HookedEncoderDecoder, HookedTransformer, KVCache, build_model
from interp.perf.memory import keep_freed_memory
from interp.viz import AttentionView, show_attention

#: TransformerLens' name for the KV cache (it has ``init_cache(cfg, device, batch_size)``)
HookedTransformerKeyValueCache = KVCache

__version__ = "0.1.0"


def load_pretrained(source, **overrides):
    """Load a model with its tokenizer: a built-in name ("minilm", "smollm2-135m"), a Hugging
    Face folder, a GGUF file, an in-memory transformers model, an interp checkpoint (.pt) or a
    JSON config (random weights). See :mod:`interp.loading`."""
    from interp.loading import load_pretrained as _load

    return _load(source, **overrides)


def load_pretrained_no_processing(source, **overrides):
    """The raw checkpoint weights, as TransformerLens' ``from_pretrained_no_processing`` (also
    what :func:`load_pretrained` gives unless asked to process). See :mod:`interp.processing`."""
    from interp.loading import load_pretrained_no_processing as _load

    return _load(source, **overrides)


__all__ = [
    "ActivationStore",
    "AttentionView",
    "HookNameError",
    "HookedEncoderDecoder",
    "HookedTransformer",
    "HookedTransformerKeyValueCache",
    "InterpError",
    "KVCache",
    "MaskSpec",
    "ModelConfig",
    "build_model",
    "keep_freed_memory",
    "load_pretrained",
    "load_pretrained_no_processing",
    "masks",
    "parse_mask",
    "show_attention",
    "write_activations",
]
